"""Chat template and label masking (docs/original.md, Chat format and labels).

Text: `User:{q1}\nAssistant:{a1}\nUser:{q2}\nAssistant:{a2}<eos>` — no system prompt, no space
after the colon. Token ids are built by tokenising the pieces separately,
  "User:"+q1 | "\nAssistant:" | a1 | "\nUser:"+q2 | "\nAssistant:" | a2 | <eos>
so the prompt boundary can never merge into the answer's first token (the original tokenised
"\nAssistant:"+answer together and masked a fixed prefix length, which is off by one whenever the
colon merges with the answer; this is a deliberate fix).

Labels (unshifted, one per id; IGNORE = not trained), as the original:
  * answer tokens and the final EOS are labels;
  * the FIRST position of every later user turn is labelled EOS: the model learns to emit EOS
    after every answer, although the input stream continues with "\n";
  * everything else (user text, "\nAssistant:") is IGNORE.
shift() then turns labels into next-token targets WITHIN the sample.
"""

import numpy as np

IGNORE = -1
USER, ASSISTANT, SEP = "User:", "Assistant:", "\n"


class ChatEncoder:
  """encode(turns) -> (ids int32[L], labels int32[L]); caches the constant "\nAssistant:" ids."""

  def __init__(self, tokenizer):
    self.tok = tokenizer
    self.eos = tokenizer.eos_id
    self._assistant = tokenizer.encode(SEP + ASSISTANT)

  def __call__(self, turns):
    ids, labels = [], []
    for i, text in enumerate(turns):
      if i % 2 == 0:                        # user turn
        piece = self.tok.encode((SEP if i else "") + USER + text)
        ids += piece
        labels += [IGNORE] * len(piece)
        if i and piece:
          labels[-len(piece)] = self.eos      # EOS after the previous answer
      else:                                 # assistant turn: prompt marker, then the answer
        ids += self._assistant
        labels += [IGNORE] * len(self._assistant)
        answer = self.tok.encode(text)
        ids += answer
        labels += answer
    ids.append(self.eos)
    labels.append(self.eos)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def shift(ids, labels, pad_id=0):
  """Next-token targets within one sample: targets[t] = ids[t+1], trained where labels[t+1] is
  set (its value may differ from ids[t+1]: the EOS label at a later user turn). The last token
  has no target (pad_id, mask 0), so nothing is ever predicted across samples."""
  n = len(ids)
  targets = np.full(n, pad_id, np.int32)
  mask = np.zeros(n, np.int32)
  if n > 1:
    nxt = labels[1:]
    targets[:-1] = np.where(nxt != IGNORE, nxt, ids[1:])
    mask[:-1] = nxt != IGNORE
  return targets, mask


def template_text(turns, eos_text="<eos>"):
  """The plain-text serialisation (for docs and checks): decode(ids) equals this with EOS decoded."""
  parts = []
  for i, t in enumerate(turns):
    parts.append((USER if i % 2 == 0 else ASSISTANT) + t)
  return SEP.join(parts) + eos_text
