"""The 50 languages of Apollo-MoE, their 7 language families and the language -> expert maps.

Data always carries a language *index* (0..49, the order of `CODES`); the model maps it to an
expert with one of the constant tables in `EXPERT_MAPS`, so one dataset serves every variant.

The family grouping and its labels are the original's (docs/original.md, Languages), kept verbatim because the
released checkpoints were trained with them. Its oddities, documented rather than "fixed":
  * `ne` (Nepali) sits in "Altaic"; the paper's Table 3 prints it "Mongolian (Ne)" and the HF
    dataset tags use `mn` where the data keys say `ne`;
  * `doi` (Dogri) is printed "Dogue" and placed in "Austronesian";
  * `gn` (Guarani) is in "Indo-European"; `nso` is printed "Sepeti";
  * the HF tags use `ku` where the data keys say `ckb` (Central Kurdish).
"""

import numpy as np

# code: (English name, family index, tier)
_TABLE = {
    # 12 major (high-resource) languages
    "en": ("English", 4, "major"),
    "zh": ("Chinese", 0, "major"),
    "fr": ("French", 4, "major"),
    "hi": ("Hindi", 4, "major"),
    "es": ("Spanish", 4, "major"),
    "ar": ("Arabic", 5, "major"),
    "ru": ("Russian", 4, "major"),
    "ja": ("Japanese", 1, "major"),
    "ko": ("Korean", 1, "major"),
    "de": ("German", 4, "major"),
    "it": ("Italian", 4, "major"),
    "pt": ("Portuguese", 4, "major"),
    # 38 minor (low-resource) languages (the original's `language_family` list)
    "ckb": ("Central Kurdish", 5, "minor"),
    "mg": ("Malagasy", 3, "minor"),
    "gn": ("Guarani", 4, "minor"),
    "gl": ("Galician", 4, "minor"),
    "gd": ("Scottish Gaelic", 4, "minor"),
    "cs": ("Czech", 4, "minor"),
    "co": ("Corsican", 4, "minor"),
    "ln": ("Lingala", 6, "minor"),
    "ceb": ("Cebuano", 3, "minor"),
    "lb": ("Luxembourgish", 4, "minor"),
    "la": ("Latin", 4, "minor"),
    "uk": ("Ukrainian", 4, "minor"),
    "bs": ("Bosnian", 4, "minor"),
    "bm": ("Bambara", 6, "minor"),
    "bg": ("Bulgarian", 4, "minor"),
    "eo": ("Esperanto", 4, "minor"),
    "mai": ("Maithili", 4, "minor"),
    "sw": ("Swahili", 6, "minor"),
    "su": ("Sundanese", 3, "minor"),
    "sr": ("Serbian", 4, "minor"),
    "sq": ("Albanian", 4, "minor"),
    "sk": ("Slovak", 4, "minor"),
    "da": ("Danish", 4, "minor"),
    "ilo": ("Ilocano", 3, "minor"),
    "sa": ("Sanskrit", 4, "minor"),
    "doi": ("Dogri", 3, "minor"),
    "nso": ("Northern Sotho", 6, "minor"),
    "ig": ("Igbo", 6, "minor"),
    "rw": ("Kinyarwanda", 6, "minor"),
    "no": ("Norwegian", 4, "minor"),
    "hr": ("Croatian", 4, "minor"),
    "ha": ("Hausa", 6, "minor"),
    "mt": ("Maltese", 5, "minor"),
    "vi": ("Vietnamese", 2, "minor"),
    "lo": ("Lao", 2, "minor"),
    "ne": ("Nepali", 1, "minor"),
    "he": ("Hebrew", 5, "minor"),
    "th": ("Thai", 2, "minor"),
}

# Family labels exactly as printed in the paper's Table 3 (index = expert of the released models).
FAMILIES = ("Sino-Tibetan", "Altaic", "Australasian", "Austronesian", "Indo-European",
            "Afro-Asian", "Kongolese")

CODES = tuple(_TABLE)                      # index i <-> CODES[i]; data stores the index
MAJOR = tuple(c for c in CODES if _TABLE[c][2] == "major")
MINOR = tuple(c for c in CODES if _TABLE[c][2] == "minor")
NAMES = {c: v[0] for c, v in _TABLE.items()}
# The original's 12-expert runs number the major languages alphabetically.
MAJOR_ALPHABETICAL = tuple(sorted(MAJOR))

_INDEX = {c: i for i, c in enumerate(CODES)}


def index(code: str) -> int:
  """Language index (0..49) of a code such as 'en' or 'ckb'."""
  try:
    return _INDEX[code]
  except KeyError:
    raise ValueError(f"unknown language code {code!r}; known codes: {', '.join(CODES)}") from None


def family(code: str) -> int:
  return _TABLE[CODES[index(code)]][1]


def family_name(code: str) -> str:
  return FAMILIES[family(code)]


def tier(code: str) -> str:
  return _TABLE[CODES[index(code)]][2]


def _map_table(name: str):
  if name == "family7":
    return np.array([_TABLE[c][1] for c in CODES], np.int32)
  if name == "major12":
    # One expert per major language, numbered alphabetically. Minor languages have no expert of
    # their own: -1 means "no forced expert", and such tokens are routed by plain top-k.
    return np.array([MAJOR_ALPHABETICAL.index(c) if c in MAJOR else -1 for c in CODES], np.int32)
  if name == "lang50":
    return np.arange(len(CODES), dtype=np.int32)
  raise ValueError(f"unknown expert map {name!r}; choose one of {', '.join(EXPERT_MAPS)}")


EXPERT_MAPS = ("family7", "major12", "lang50")
NUM_EXPERTS = {"family7": len(FAMILIES), "major12": len(MAJOR), "lang50": len(CODES)}


def expert_map(name: str) -> np.ndarray:
  """int32 table [50]: language index -> expert index under the named map (-1: none)."""
  return _map_table(name)


def language_of_source(source: str) -> str:
  """Language code of an ApolloMoEDataset source key: its second `_` field, as the original.

  'medicalBook_en_qa' -> 'en', 'general_ckb' -> 'ckb', 'code_zh' -> 'zh'.
  """
  parts = source.split("_")
  if len(parts) < 2:
    raise ValueError(f"source key {source!r} has no language field (expected e.g. 'general_en')")
  index(parts[1])          # validate
  return parts[1]
