"""PNG plots: training curves from metrics.jsonl (`python -m apollo_jax.plot --workdir=DIR`) and the
routing heatmaps of apollo_jax.analyze (like paper Figure 3).

Curves written to DIR/plots/ (or --out): loss.png (train loss and eval loss, from the step-0
baseline), lr.png, grad_norm.png, tokens_per_s.png, family_loss.png (train solid, eval dashed),
moe_load.png (one panel per MoE layer, one line per expert) and moe_drop.png (drop fraction per
layer). A curve without data (e.g. no MoE layers) is skipped.

Every figure has a fixed size in pixels (no tight bounding box), so its PNG size is known:
DPI * the figure size given below.
"""

import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax.runtime import workdir as workdir_io  # noqa: E402

DPI = 100
CURVE_SIZE = (6.4, 4.0)        # inches: 640 x 400 px


def _series(recs, key):
  pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path):
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
  return path


def _curve_figure(rows=1, cols=1, size=CURVE_SIZE):
  fig, axes = plt.subplots(rows, cols, figsize=size, dpi=DPI, squeeze=False)
  return fig, axes.reshape(-1)


def _lines(out_dir, name, recs, keys, title, ylabel, logy=False):
  """One figure with a line per key that has data; None if none has."""
  data = [(k, *_series(recs, k)) for k in keys]
  data = [d for d in data if d[1]]
  if not data:
    return None
  fig, (ax,) = _curve_figure()
  for key, x, y in data:
    ax.plot(x, y, marker="." if len(x) < 30 else None, label=key)
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  if logy:
    ax.set_yscale("log")
  ax.grid(alpha=0.3)
  if len(data) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, os.path.join(out_dir, name))


def _family_losses(out_dir, recs):
  fams = sorted({k[len("loss/"):] for r in recs for k in r if k.startswith("loss/")})
  if not fams:
    return None
  fig, (ax,) = _curve_figure()
  colors = plt.get_cmap("tab10")
  for i, fam in enumerate(fams):
    for key, style in ((f"loss/{fam}", "-"), (f"eval_loss/{fam}", "--")):
      x, y = _series(recs, key)
      if x:
        ax.plot(x, y, style, color=colors(i % 10), label=fam if style == "-" else None)
  ax.set(title="loss per language family (eval dashed)", xlabel="step", ylabel="cross-entropy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _save(fig, os.path.join(out_dir, "family_loss.png"))


def _moe_layers(recs, stat):
  pat = re.compile(rf"moe/layer_(\d+)/{stat}$")
  return sorted({int(m.group(1)) for r in recs for k in r for m in [pat.match(k)] if m})


def _moe_load(out_dir, recs):
  layers = _moe_layers(recs, "load")
  if not layers:
    return None
  fig, axes = _curve_figure(1, len(layers), (max(CURVE_SIZE[0], 3.2 * len(layers)), CURVE_SIZE[1]))
  for ax, layer in zip(axes, layers):
    x, y = _series(recs, f"moe/layer_{layer}/load")
    y = np.asarray(y)
    for e in range(y.shape[1]):
      ax.plot(x, y[:, e], label=str(e))
    ax.set(title=f"layer {layer}", xlabel="step", ylim=(0, None))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("share of assignments")
  axes[-1].legend(title="expert", fontsize=7)
  fig.suptitle("expert load per MoE layer")
  fig.tight_layout()
  return _save(fig, os.path.join(out_dir, "moe_load.png"))


def training_curves(workdir: str, out_dir: str = "") -> list:
  """Writes the curve PNGs of DIR/metrics.jsonl; returns their paths."""
  recs = workdir_io.read_metrics(workdir)
  out_dir = out_dir or os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  drops = [f"moe/layer_{i}/drop_fraction" for i in _moe_layers(recs, "drop_fraction")]
  paths = [
      _lines(out_dir, "loss.png", recs, ("loss", "eval_loss"), "loss", "cross-entropy"),
      _lines(out_dir, "lr.png", recs, ("lr",), "learning rate", "lr"),
      _lines(out_dir, "grad_norm.png", recs, ("grad_norm",), "gradient global norm", "norm", logy=True),
      _lines(out_dir, "tokens_per_s.png", recs, ("tokens_per_s",), "throughput", "tokens/s"),
      _family_losses(out_dir, recs),
      _moe_load(out_dir, recs),
      _lines(out_dir, "moe_drop.png", recs, drops, "dropped assignments per MoE layer", "fraction"),
  ]
  return [p for p in paths if p]


# ---- routing heatmaps (apollo_jax.analyze) -------------------------------------------------------

# Heatmap layout in inches: margins around a grid of fixed-size cells, then the colorbar.
CELL_W, CELL_H = 0.5, 0.4
LEFT, RIGHT, BOTTOM, TOP, BAR = 0.8, 1.0, 1.1, 0.45, 0.5


def heatmap_size(rows: int, cols: int) -> tuple:
  """Figure size (inches) of a rows x cols heatmap; its PNG is DPI * this pixels."""
  return (LEFT + CELL_W * cols + RIGHT + BAR, BOTTOM + CELL_H * rows + TOP)


def _heatmap(path, values, title, xlabels, ylabels, vmax, xlabel, annot=None, right=None):
  """values [rows, cols]; rows drawn bottom-up (first layer at the bottom, as the original)."""
  values = np.asarray(values, np.float64)
  rows, cols = values.shape
  W, H = heatmap_size(rows, cols)
  fig = plt.figure(figsize=(W, H), dpi=DPI)
  ax = fig.add_axes((LEFT / W, BOTTOM / H, CELL_W * cols / W, CELL_H * rows / H))
  cax = fig.add_axes(((W - BAR + 0.1) / W, BOTTOM / H, 0.12 / W, CELL_H * rows / H))
  im = ax.imshow(values, cmap="Reds", vmin=0.0, vmax=vmax, origin="lower", aspect="auto")
  for i in range(rows):
    for j in range(cols):
      text = f"{values[i, j]:.2f}" if annot is None else annot[i][j]
      ax.text(j, i, text, ha="center", va="center", fontsize=7,
              color="white" if values[i, j] > 0.6 * vmax else "black")
  long = max(len(x) for x in xlabels) > 3
  ax.set_xticks(range(cols), xlabels, fontsize=7, rotation=90 if long else 0)
  ax.set_yticks(range(rows), ylabels, fontsize=7)
  ax.set(xlabel=xlabel, ylabel="layer")
  if right is not None:                 # per-layer numbers (the specialization) on the right
    twin = ax.twinx()
    twin.set_ylim(ax.get_ylim())
    twin.set_yticks(range(rows), right, fontsize=7)
  ax.set_title(title, fontsize=9, loc="left")
  fig.colorbar(im, cax=cax)
  cax.tick_params(labelsize=7)
  return _save(fig, path)


def routing_heatmaps(result: dict, out_dir: str, group: str = "language") -> list:
  """Figure-3-style PNGs of an analyze result: one layers x experts heatmap per group, the average
  over groups, and a layers x groups panel of each group's dominant-expert share."""
  g = result[group]
  layers = [str(i) for i in result["moe_layers"]]     # 0-based, as moe.layers and metrics.jsonl
  experts = [str(e) for e in range(result["num_experts"])]
  vmax = 1.0 / result["top_k"]
  spec = [f"S={s:.2f} ({c:.2f})" for s, c in zip(g["specialization"], g["specialization_chance"])]
  os.makedirs(os.path.join(out_dir, "heatmaps"), exist_ok=True)
  paths = []
  for name in g["groups"]:
    file = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    paths.append(_heatmap(os.path.join(out_dir, "heatmaps", f"{group}_{file}.png"),
                          g["fraction"][name], f"{name} ({g['tokens'][name]} tokens)",
                          experts, layers, vmax, "expert"))
  paths.append(_heatmap(os.path.join(out_dir, "heatmap_average.png"), g["average"],
                        f"AVG over {len(g['groups'])} {group} groups; S = specialization (chance)",
                        experts, layers, vmax, "expert", right=spec))
  if g["groups"]:
    share = np.array([g["dominant_share"][n] for n in g["groups"]]).T      # [layers, groups]
    annot = np.array([g["dominant_expert"][n] for n in g["groups"]]).T.astype(str)
    paths.append(_heatmap(os.path.join(out_dir, f"dominant_{group}.png"), share,
                          "share of tokens on the dominant expert (number: that expert)",
                          g["groups"], layers, 1.0, group, annot=annot, right=spec))
  return paths
