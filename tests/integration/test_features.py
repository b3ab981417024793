"""`clt features` end to end: the fit-end callback, the CLI, and the site in a real browser.

The browser test opens the site from disk in headless Chromium (Debian's `chromium`
package; `make browser` installs it) and reads the DOM after the scripts ran: the pages
record JavaScript errors in `body[data-errors]` (a window error handler) and set
`body[data-ready]` when they finished drawing. Screenshots of both pages are kept in
`$CLT_TEST_ARTIFACTS` (default: the test's tmp folder; the path is printed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from clt_lightning.features.store import FeatureStore
from tests.integration.tiny_run import quiet_cli, write_config

N_TOP = 4
CALLBACK = {
    "class_path": "clt_lightning.features.callback.FeaturesCallback",
    "init_args": {"config": {"n_top": N_TOP, "classifier_cache": None, "max_images": 12}},
}


@pytest.fixture(scope="module")
def features_run(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-epoch fit with the FeaturesCallback, then `clt features` into `site/`."""
    root = tmp_path_factory.mktemp("features")
    config = write_config(
        root / "run.yaml",
        tiny_cache,
        root / "run",
        **{"trainer.max_epochs": 1, "trainer.callbacks": [CALLBACK]},
    )
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err
    ckpt = next((root / "run" / "checkpoints").glob("*.ckpt"))
    site = root / "site"
    args = ["features", "--config", str(config), "--ckpt_path", str(ckpt)]
    args += ["--latents.output_dir", str(site), "--latents.n_top", str(N_TOP)]
    code, err = quiet_cli([*args, "--latents.classifier_cache", "null"])
    assert code == 0, err
    return {"root": root, "config": config, "ckpt": ckpt, "site": site}


def test_callback_builds_the_site_at_fit_end(features_run: dict[str, Path]) -> None:
    folder = features_run["root"] / "run" / "features"
    assert (folder / "index.html").is_file() and (folder / "features.json").is_file()
    store = FeatureStore.open(folder)
    assert store.manifest["n_images"] == 12 and store.n_top == N_TOP


def test_cli_writes_store_and_site(features_run: dict[str, Path]) -> None:
    site = features_run["site"]
    store = FeatureStore.open(site)
    assert store.manifest["checkpoint"] == str(features_run["ckpt"])
    assert store.manifest["n_images"] == 16  # the whole val split of the tiny run
    for name in ("index.html", "latent.html", "assets/site.js", "data/summary.js"):
        assert (site / name).is_file(), name
    shown = {t.image for i in range(store.n_latents) for t in store.latent(0, i).top["all"]}
    assert {int(p.stem) for p in (site / "thumbs").glob("*.jpg")} >= shown


def test_cli_refuses_a_folder_of_another_clt(features_run: dict[str, Path]) -> None:
    root = features_run["root"]
    # a second CLT of the same teacher: another seed, no callback
    data = yaml.safe_load(features_run["config"].read_text())
    data["seed_everything"] = 5
    data["trainer"]["default_root_dir"] = str(root / "run2")
    data["trainer"]["logger"]["init_args"]["save_dir"] = str(root / "run2")
    data["trainer"].pop("callbacks")
    config = root / "run2.yaml"
    config.write_text(yaml.safe_dump(data))
    code, err = quiet_cli(["fit", "--config", str(config)])
    assert code == 0, err
    ckpt2 = next((root / "run2" / "checkpoints").glob("*.ckpt"))
    args = ["features", "--config", str(config), "--ckpt_path", str(ckpt2)]
    args += ["--latents.output_dir", str(features_run["site"])]
    before = (features_run["site"] / "features.json").read_text()
    code, err = quiet_cli(args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert re.search(
        r"another CLT \(fingerprint [0-9a-f]{16}, this checkpoint [0-9a-f]{16}\)", line
    )
    assert (features_run["site"] / "features.json").read_text() == before


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def run_chromium(binary: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url`; scripts get 10 s of virtual time before the output."""
    args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    args += [f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
    args += ["--enable-logging=stderr", "--v=0", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def open_page(binary: str, url: str, screenshot: Path, profile: Path) -> str:
    """Screenshot the page, then return its DOM after the scripts ran (asserting no JS error)."""
    shot = run_chromium(
        binary, url, profile, "--window-size=1400,1600", f"--screenshot={screenshot}"
    )
    assert screenshot.is_file(), shot.stderr[-2000:]
    dom = run_chromium(binary, url, profile, "--dump-dom")
    console_errors = [x for x in dom.stderr.splitlines() if "CONSOLE" in x and "Uncaught" in x]
    assert not console_errors, console_errors
    assert "data-errors" not in dom.stdout, re.findall(r'id="errors"[^>]*>([^<]*)', dom.stdout)
    return dom.stdout


@pytest.mark.skipif(
    chromium() is None,
    reason="Chromium is not installed (Debian: `make browser` or `apt-get install chromium`); "
    "the site is then not checked in a browser",
)
def test_site_in_headless_chromium(features_run: dict[str, Path], tmp_path: Path) -> None:
    binary = chromium()
    site = features_run["site"]
    artifacts = Path(os.environ.get("CLT_TEST_ARTIFACTS") or tmp_path) / "features-site"
    artifacts.mkdir(parents=True, exist_ok=True)
    print(f"site screenshots: {artifacts}")
    store = FeatureStore.open(site)
    layer, index = next(
        (s, i)
        for s in range(store.n_layers)
        for i in range(store.n_latents)
        if len(store.latent(s, i).top["all"]) == N_TOP
    )
    dom = open_page(
        binary, (site / "index.html").as_uri(), artifacts / "index.png", tmp_path / "p1"
    )
    assert 'data-ready="index"' in dom
    assert 'id="share-heatmap"' in dom  # the layer x layer write-share heatmap
    assert dom.count('data-layer="') == store.n_layers  # one card per layer
    assert dom.count('href="latent.html#0/') >= 10  # the latent table of layer 0
    url = (site / "latent.html").as_uri() + f"#{layer}/{index}"
    dom = open_page(binary, url, artifacts / "latent.png", tmp_path / "p2")
    assert 'data-ready="latent"' in dom
    assert dom.count('class="thumb"') == N_TOP  # N top images ...
    assert dom.count('data-drawn="1"') == N_TOP  # ... each with its patch heatmap drawn
    for panel in ('class="histogram"', 'class="write-profile"', 'class="contribution"'):
        assert panel in dom
    assert f"Layer {layer} · latent {index}" in dom
