"""Generate text with the KV cache:

  python -m apollo_jax.generate --model=runs/tiny --prompt="What is a fever?" --chat
  python -m apollo_jax.generate --model=runs/tiny --prompts=in.jsonl --out=out.jsonl [--chat]

--model is anything `apollo_jax.inference.load` reads (training workdir, convert_from_hf dir, HF
dir). With --chat the prompt is the user turn of the training chat format (`User:{q}\\nAssistant:`).
Batch mode reads one JSON object per line with "prompt" (a string) or "messages" (a chat:
[{"role": "user", "content": ...}, ...]) and writes each object back with a "completion" field,
in the input order, with a progress bar. Greedy unless --temperature > 0 (seeded).
"""

import json
import sys

from absl import app, flags


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  flags.DEFINE_string("model", None, "Training workdir, convert_from_hf dir or HF dir.")
  flags.DEFINE_string("prompt", None, "One prompt (printed with its completion).")
  flags.DEFINE_string("prompts", None, "JSONL file: {'prompt': str} or {'messages': [...]} per line.")
  flags.DEFINE_string("out", None, "JSONL output for --prompts (default: stdout).")
  flags.DEFINE_bool("chat", False, "Wrap --prompt / 'prompt' in the chat template as the user turn.")
  flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most per prompt.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample (seeded by --seed).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("batch_size", 16, "Prompts per generation batch.")
  flags.DEFINE_integer("step", None, "Workdir checkpoint step (default: the latest complete one).")
  flags.DEFINE_string("language", None, "Language code for routing='language' models (e.g. en).")


def read_prompts(path):
  """JSONL -> list of dicts, each with 'prompt' (str) or 'messages' (list); clear errors."""
  items = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e})") from None
      if not isinstance(item, dict) or not (isinstance(item.get("prompt"), str)
                                            or isinstance(item.get("messages"), list)):
        raise ValueError(f"{path}:{n}: expected an object with 'prompt' (a string) or 'messages' (a list)")
      items.append(item)
  if not items:
    raise ValueError(f"{path}: no prompts")
  return items


def as_ids(lm, item, chat: bool):
  """One prompt item -> token ids (chat items through the training chat template)."""
  if "messages" in item:
    return lm.chat_prompt(item["messages"])
  if chat:
    return lm.chat_prompt([{"role": "user", "content": item["prompt"]}])
  return lm._tok().encode(item["prompt"])


def run(lm, items, chat=False, progress=None, **kwargs):
  """Completions (strings) for prompt items, in order."""
  ids = [as_ids(lm, it, chat) for it in items]
  return [lm.decode(g) for g in lm.generate(ids, progress=progress, **kwargs)]


def main(argv):
  del argv
  f = flags.FLAGS
  if (f.prompt is None) == (f.prompts is None):
    raise app.UsageError("exactly one of --prompt / --prompts is required")
  items = [{"prompt": f.prompt}] if f.prompt is not None else read_prompts(f.prompts)
  from apollo_jax import inference
  lm = inference.load(f.model, step=f.step)
  kwargs = dict(max_new_tokens=f.max_new_tokens, temperature=f.temperature, top_p=f.top_p, seed=f.seed,
                batch_size=f.batch_size, language=f.language)
  if f.prompt is not None:
    print(run(lm, items, f.chat, **kwargs)[0], flush=True)
    return
  import tqdm
  with tqdm.tqdm(total=len(items), desc="generate", unit="prompt", file=sys.stderr) as bar:
    completions = run(lm, items, f.chat, progress=bar.update, **kwargs)
  out = open(f.out, "w", encoding="utf-8") if f.out else sys.stdout
  try:
    for item, text in zip(items, completions):
      out.write(json.dumps({**item, "completion": text}, ensure_ascii=False) + "\n")
  finally:
    if f.out:
      out.close()
  if f.out:
    print(f"wrote {len(items)} completions to {f.out}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  from apollo_jax.runtime import cli
  cli.run(main, required=("model",))
