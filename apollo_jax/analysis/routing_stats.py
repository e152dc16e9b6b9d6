"""Routing analysis: how each MoE layer spreads the tokens of each language over its experts.

Counting (docs/original.md, Routing analysis, with the original's padding bug fixed). Per MoE
layer, per group (a language, or a language family), from each real token's top-k chosen experts:
  * `fraction[g, e]` = assignments of group g's tokens to expert e / all of g's assignments. Every
    token contributes k assignments, so each row sums to 1 and one expert's maximum is 1/k (this
    is what the original plotted);
  * `per_token[g, e]` = tokens of g that have e among their k choices / tokens of g, in [0, 1]
    (a row sums to k): "what share of the language's tokens pass through expert e".
Padding (mask 0) and invalid slots (-1) are never counted; the original counted left-padding
whenever it ran with batch > 1.

Specialization number of a layer (the "Spread Out in the End" measure), in [0, 1]:

  S = I(G; E) / min(H(G), H(E))

the normalised mutual information between the group G of a token and an expert E it is assigned
to, where every top-k assignment is one draw and every group is weighted EQUALLY (p(g) = 1/#groups,
p(e | g) = fraction[g, e]), so that the language mix of the analysed data does not move the number.
S = 0: routing ignores the language (every group has the same expert distribution). S = 1: the
language determines the expert (H(E|G) = 0) or every expert serves a single language
(H(G|E) = 0). In between it grows as the groups' expert distributions separate.
"""

import numpy as np

from apollo_jax import languages

GROUPINGS = ("language", "family")
DEFINITIONS = {
    "fraction": "per MoE layer and group: top-k assignments to each expert / all the group's "
                "assignments (each row sums to 1; max 1/top_k per expert)",
    "per_token": "per MoE layer and group: share of the group's tokens with the expert among their "
                 "top-k choices (in [0, 1]; a row sums to top_k)",
    "average": "mean of the groups' fraction rows (groups weighted equally), as the original's AVG",
    "dominant_share": "per_token of the group's most-used expert (dominant_expert)",
    "specialization": "I(G;E) / min(H(G), H(E)) over top-k assignments, groups weighted equally: "
                      "0 = routing ignores the group, 1 = the group determines the expert or every "
                      "expert serves one group",
    "specialization_chance": "mean specialization of 20 simulated routings that ignore the group "
                             "(each group's assignments drawn from the pooled distribution, same "
                             "counts): the finite-sample floor to compare specialization against",
    "padding": "padding tokens and invalid (-1) slots are never counted",
}


def group_names(grouping: str) -> tuple:
  """Group labels: 50 language codes or the 7 family names (index = group id)."""
  if grouping == "language":
    return languages.CODES
  if grouping == "family":
    return languages.FAMILIES
  raise ValueError(f"unknown grouping {grouping!r}; choose one of {', '.join(GROUPINGS)}")


def group_ids(language_ids, grouping: str) -> np.ndarray:
  """Language indices (0..49) -> group ids of `grouping` (the same shape)."""
  language_ids = np.asarray(language_ids)
  if grouping == "family":
    return languages.expert_map("family7")[language_ids]
  group_names(grouping)     # validates
  return language_ids


class RoutingCounts:
  """Accumulates top-k assignments per (MoE layer, group, expert) over batches."""

  def __init__(self, layers, num_groups: int, num_experts: int):
    self.layers = list(layers)                      # decoder-layer indices of the MoE layers
    L = len(self.layers)
    self.num_experts = num_experts
    self.assign = np.zeros((L, num_groups, num_experts), np.int64)
    self.tokens = np.zeros((L, num_groups), np.int64)

  def add(self, chosen: dict, groups, mask):
    """chosen: {layer: int [B, S, K] expert ids, -1 = none}; groups [B, S]; mask [B, S] (0 = pad)."""
    groups = np.asarray(groups).reshape(-1)
    mask = np.asarray(mask).reshape(-1).astype(bool)
    for li, layer in enumerate(self.layers):
      c = np.asarray(chosen[layer])
      c = c.reshape(-1, c.shape[-1])
      ok = (c >= 0) & (c < self.num_experts) & mask[:, None]
      g = np.broadcast_to(groups[:, None], c.shape)
      np.add.at(self.assign[li], (g[ok], c[ok]), 1)
      routed = ok.any(-1)
      np.add.at(self.tokens[li], groups[routed], 1)

  def fraction(self) -> np.ndarray:
    """[L, G, E]: share of each group's assignments per expert (rows sum to 1; 0 rows: no tokens)."""
    total = self.assign.sum(-1, keepdims=True)
    return np.where(total > 0, self.assign / np.maximum(total, 1), 0.0)

  def per_token(self) -> np.ndarray:
    """[L, G, E]: share of each group's tokens that chose the expert among their top-k."""
    t = self.tokens[..., None]
    return np.where(t > 0, self.assign / np.maximum(t, 1), 0.0)

  def present(self) -> np.ndarray:
    """Indices of the groups that have tokens (in every MoE layer)."""
    return np.flatnonzero(self.tokens.min(0) > 0) if len(self.layers) else np.zeros(0, int)


def regroup(counts: RoutingCounts, table, num_groups: int) -> RoutingCounts:
  """Counts of coarser groups: group i of `counts` adds to group table[i] (e.g. language -> family)."""
  out = RoutingCounts(counts.layers, num_groups, counts.num_experts)
  for i, g in enumerate(np.asarray(table)):
    out.assign[:, g] += counts.assign[:, i]
    out.tokens[:, g] += counts.tokens[:, i]
  return out


def _entropy(p) -> float:
  p = np.asarray(p, np.float64)
  p = p[p > 0]
  return float(-(p * np.log(p)).sum())


def specialization(fraction) -> float:
  """Normalised mutual information of (group, expert) from rows p(e | g) [G, E], groups weighted
  equally (module docstring). 0 = independent of the group, 1 = group determines the expert or
  each expert serves one group. Rows that are all zero (no tokens) are ignored."""
  f = np.asarray(fraction, np.float64)
  f = f[f.sum(-1) > 0]
  if len(f) < 2:
    return 0.0
  f = f / f.sum(-1, keepdims=True)
  joint = f / len(f)                                   # p(g, e) with p(g) = 1/G
  h_g, h_e = np.log(len(f)), _entropy(joint.sum(0))
  mi = h_g + h_e - _entropy(joint)
  denom = min(h_g, h_e)
  return float(np.clip(mi / denom, 0.0, 1.0)) if denom > 1e-12 else 0.0


def chance_specialization(assign, draws: int = 20, seed: int = 0) -> float:
  """Mean specialization when every group draws its assignment count from the pooled expert
  distribution (routing independent of the group): nonzero only through finite counts."""
  assign = np.asarray(assign)
  assign = assign[assign.sum(-1) > 0]
  if len(assign) < 2:
    return 0.0
  pooled = assign.sum(0) / assign.sum()
  rng = np.random.default_rng(seed)
  sims = [specialization(np.stack([rng.multinomial(n, pooled) for n in assign.sum(-1)]))
          for _ in range(draws)]
  return float(np.mean(sims))


def summarize(counts: RoutingCounts, grouping: str) -> dict:
  """The JSON-ready result of one grouping: per-group fractions, the average, specialization."""
  names = group_names(grouping)
  present = counts.present()
  frac, per_tok = counts.fraction(), counts.per_token()
  out = {"groups": [names[g] for g in present], "tokens": {}, "fraction": {}, "per_token": {},
         "dominant_expert": {}, "dominant_share": {}}
  for g in present:
    n = names[g]
    out["tokens"][n] = int(counts.tokens[:, g].max())
    out["fraction"][n] = frac[:, g].round(6).tolist()
    out["per_token"][n] = per_tok[:, g].round(6).tolist()
    out["dominant_expert"][n] = per_tok[:, g].argmax(-1).tolist()
    out["dominant_share"][n] = per_tok[:, g].max(-1).round(6).tolist()
  # AVG as the original: the mean of the groups' distributions (each group weighted equally)
  out["average"] = (frac[:, present].mean(1).round(6).tolist() if len(present)
                    else [[0.0] * counts.num_experts for _ in counts.layers])
  out["specialization"] = [round(specialization(frac[li, present]), 6)
                           for li in range(len(counts.layers))]
  out["specialization_chance"] = [round(chance_specialization(counts.assign[li, present]), 6)
                                  for li in range(len(counts.layers))]
  return out
