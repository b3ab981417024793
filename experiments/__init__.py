"""Scripts around the package: the paper's grid, its published numbers, and the report.

- `paper_numbers`: the reference paper's numbers, transcribed exactly.
- `sweep`: runs the paper's 18 CLTs one after another (cache, fit, evaluate), resumable.
- `sweep_agent`: one run of that grid for a W&B sweep agent (`wandb_sweep.yaml`).
- `results`: reads finished run folders (`<runs>/<run>/evaluation/*.json`).
- `tables`: turns them into the paper's tables (Markdown, CSV) and figures, beside the
  published numbers.

`clt_lightning` never imports this package; this package may import `clt_lightning`.
"""
