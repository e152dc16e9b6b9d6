"""The lm-evaluation-harness task of write_lm_eval_task: real lm-eval (HF backend, the fp32 export)
scores every option of the sample with the log-likelihood `evaluate --mode=loglik` gives it.

lm-eval tokenises prompt + choice together and splits at the prompt's length; ours tokenises
them apart: the same ids here because "Assistant:" (the prompt's end) is a user-defined symbol.
The shots' EOS text becomes the EOS id on both sides.
"""

import json
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")

import lm_fixtures as lf  # noqa: E402
from tolerance import assert_close, network_terms  # noqa: E402
from apollo_jax import write_lm_eval_task  # noqa: E402
from apollo_jax.evaluation import lm_eval_task, runner  # noqa: E402

BENCH = os.path.join(lf.REPO, "data/sample/apollo_moe_bench_sample.json")


@pytest.mark.slow
def test_lm_eval_gives_our_option_logliks(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
  lm = lf.randomized("hybrid8")
  out = lf.export(lm, str(tmp_path / "export"))
  path, n, _ = write_lm_eval_task.write(str(tmp_path / "task"), hf_dir=out, bench=BENCH, limit=1)
  assert n == 54                                      # one question per source of the sample
  preds, _ = runner.evaluate(lm, BENCH, mode="loglik", limit=1, progress=False, batch_size=16)
  from lm_eval.tasks import TaskManager
  res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32,device=cpu",
                                tasks=[lm_eval_task.TASK], task_manager=TaskManager(include_path=os.path.dirname(path)),
                                log_samples=True, batch_size=16)
  ours = {p["id"]: p for p in preds}
  theirs, mine = [], []
  for s in res["samples"][lm_eval_task.TASK]:
    p = ours[s["doc"]["id"]]
    assert s["doc"]["gold"] == sorted(p["loglik"]).index(p["gold"])
    theirs += [r[0] for r in s["filtered_resps"]]
    mine += [p["loglik"][label] for label in sorted(p["loglik"])]
  assert len(mine) == sum(len(p["loglik"]) for p in preds) > 200
  m = lm.config.model
  # torch vs XLA, f32: a summed log-probability errs like one logit of the chain, at most its scale
  assert_close(theirs, mine, dtype=np.float32, terms=network_terms(m.num_layers, m.hidden_size, m.intermediate_size))
  acc = np.mean([p["correct"]["loglik"] for p in preds])
  assert res["results"][lm_eval_task.TASK]["acc,none"] == pytest.approx(acc)


def test_rows_are_our_prompts_with_the_eos_text(tmp_path):
  from apollo_jax.evaluation import bench, prompts
  rows, _ = lm_eval_task.rows(BENCH, "</s>", limit=2)
  pool, _ = bench.read(BENCH)
  table = prompts.load_templates()
  built, _ = prompts.build(bench.select(pool, None, 2), pool, table)
  assert [r["query"] for r in rows] == [p.text.replace("<|endoftext|>", "</s>") for p in built]
  assert [r["query"].count("</s>") for r in rows] == [len(p.shot_ids) for p in built]
  assert max(len(p.shot_ids) for p in built) == 3
  assert rows[0]["choices"] == prompts.continuations(table, built[0].item)
  yaml_text = open(lm_eval_task.write(str(tmp_path), rows)).read()
  assert 'target_delimiter: ""' in yaml_text and "num_fewshot: 0" in yaml_text
  yaml = pytest.importorskip("yaml")
  spec = yaml.safe_load(yaml_text)
  assert spec["target_delimiter"] == "" and os.path.isabs(spec["dataset_kwargs"]["data_files"]["test"])
  with open(spec["dataset_kwargs"]["data_files"]["test"]) as f:
    assert [json.loads(x) for x in f] == rows


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="--hf_dir .* or --eos_token"):
    write_lm_eval_task.write(str(tmp_path / "t"))
  with pytest.raises(ValueError, match="no eos_token"):
    lm_eval_task.eos_token_of(str(tmp_path))
