"""Latent dashboards: what each CLT latent responds to and where it writes (`clt features`).

Modules: `topk` (streaming top-N images per latent), `stats` (frequencies, histograms),
`effects` (write profile, per-latent contribution, direct effect on zero-shot classes),
`store` (the on-disk format and `FeatureStore`), `collect` (the pass and the command),
`site` (the static site), `callback` (build it at fit end). See docs/features.md.
"""
