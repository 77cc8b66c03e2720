"""The quickstart's results report: the markdown table of `results.md` (the stages' numbers, the representation
evals of MAGE beside its controls, the paper's numbers for scale) and the helpers that format its cells.
"""

from __future__ import annotations

import math
import os

from mage_jax.jobs import quickstart_data

PAPER = {
  "MAGE ViT-B ImageNet: FID": "11.1",
  "MAGE ViT-B ImageNet: linear probe": "74.7%",
  "MAGE-C ViT-L ImageNet: 10-shot": "71.9%",
}


def _pct(x) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


# The feature sets of the representation table: MAGE and the controls that show what pretraining adds.
FEATURE_SETS = (
  ("mage", "MAGE"),
  ("random_init", "same encoder at random init"),
  ("pixels", "raw pixels"),
  ("random_proj", "random projection of the pixels"),
)


CLASSIFIERS = {"logreg": "logistic regression", "ridge": "ridge"}  # `fewshot`'s protocols


def representation_table(rep: dict) -> list[str]:
  """Markdown rows: one column per feature set present, one row per classifier (and shot count)."""
  sets = [(k, title) for k, title in FEATURE_SETS if isinstance(rep.get(k), dict)]
  if not sets:
    return []
  skipped = rep.get("skipped", {})
  dims = {k: rep[k].get("logistic", {}).get("train_examples") for k, _ in sets}
  rows = []

  def row(title, eval_name, value_of):
    values = [value_of(rep[k].get(eval_name) or {}) for k, _ in sets]
    if all(v is None for v in values) and eval_name not in skipped:
      return
    rows.append([title] + [_with_reason(v, skipped.get(eval_name)) for v in values])

  train = next((n for n in dims.values() if n), None)
  row(
    f"logistic regression probe top-1 (converged, {train or 'all'} train images)", "logistic", lambda r: r.get("top1")
  )
  row("linear probe top-1 (paper protocol: BN + linear, LARS)", "linear_probe", lambda r: r.get("top1"))
  fewshot = rep.get("mage", {}).get("fewshot", {})
  for classifier in ("logreg", "ridge"):
    per_shot = fewshot.get(classifier, {})
    for shot in sorted((int(k) for k in per_shot if k.isdigit()), reverse=True):
      row(
        f"{shot}-shot top-1 ({CLASSIFIERS[classifier]}, mean of {fewshot.get('trials', '?')} draws)",
        "fewshot",
        lambda r, shot=shot, c=classifier: (r.get(c, {}).get(str(shot)) or {}).get("mean"),
      )
  if "fewshot" in skipped and not fewshot:
    row("few-shot top-1", "fewshot", lambda r: None)
  lines = [
    "| frozen features, top-1 on the held-out images | " + " | ".join(t for _, t in sets) + " |",
    "|---" * (len(sets) + 1) + "|",
  ]
  return lines + ["| " + " | ".join(r) + " |" for r in rows]


def results_table(results: dict) -> str:
  tok, mage, gen, rep, fid = (results[k] for k in ("tokenizer", "mage", "samples", "representations", "fid"))
  data = results["data"]
  heldout = "test" if data["source"] == quickstart_data.FASHION_MNIST else "held-out"
  tok_images = f"{int(tok['num_examples']):,} {heldout} images"
  rows = [(f"tokenizer PSNR on {tok_images} (dB)", f"{tok['psnr']:.2f}")]
  if "before_fine_tuning" in tok:
    rows.append((f"tokenizer PSNR on {tok_images} before fine-tuning (dB)", f"{tok['before_fine_tuning']['psnr']:.2f}"))
  rows += [
    (f"tokenizer SSIM on {tok_images}", f"{tok['ssim']:.3f}"),
    ("tokenizer codebook usage", _pct(tok["codebook_usage"])),
    ("tokenizer codebook perplexity", f"{tok['codebook_perplexity']:.1f}"),
    ("MAGE final training loss", f"{mage['loss']:.3f}"),
    ("MAGE training steps/s", f"{mage['steps'] / mage['seconds']:.2f}"),
    ("generation images/s", f"{gen['images_per_sec']:.1f}"),
  ]
  fid_value = fid.get("fid")
  where = "test split" if heldout == "test" else f"{fid.get('num_reference', 0)} held-out images"
  rows.append(
    (
      f"FID vs {where} ({fid.get('num_images', 0)} samples)",
      f"{fid_value:.2f}" if fid_value is not None else "n/a (FID weights not set up)",
    )
  )
  if fid.get("sfid") is not None:
    rows += [
      ("sFID (spatial Inception features)", f"{fid['sfid']:.2f}"),
      ("precision / recall of the samples (k = 3)", f"{_pct(fid['precision'])} / {_pct(fid['recall'])}"),
    ]
  rows.append(("wall time of this invocation (min)", f"{results['seconds'] / 60:.1f}"))
  title = "Fashion-MNIST" if heldout == "test" else f"{os.path.basename(data['path'])}, {_counts(data)}"
  lines = [f"| quantity ({title}, this run) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in rows]
  features = representation_table(rep)
  if features:
    lines += [""] + features
  elif rep.get("skipped"):
    lines += ["", "representations skipped: " + "; ".join(f"{k}: {v}" for k, v in rep["skipped"].items())]
  lines += ["", "| paper (ImageNet 256, for scale) | value |", "|---|---|"]
  lines += [f"| {k} | {v} |" for k, v in PAPER.items()]
  return "\n".join(lines)


def _with_reason(accuracy, skipped: str | None) -> str:
  """An accuracy, with why some of its eval was skipped; or why all of it was."""
  if accuracy is None and skipped:
    return f"skipped: {skipped}"
  return _pct(accuracy) + (f" ({skipped})" if skipped else "")


def _counts(data: dict) -> str:
  splits = data["splits"]
  classes = f"{len(data['classes'])} classes" if data["classes"] else "no classes"
  return f"{splits['train']['images']} train / {splits['heldout']['images']} held-out images, {classes}"
