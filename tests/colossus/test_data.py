"""colossus.data: corpus, split, tokenizers, packed blocks, collators, build_data."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from colossus.config import DataConfig
from colossus.data import (
    CausalLMCollator,
    DataBundle,
    MaskedLMCollator,
    PackedBlocks,
    build_data,
    build_packed_blocks,
    corpus_fingerprint,
    get_tokenizer,
    load_documents,
    stdlib_files,
    train_tokenizer,
)
from colossus.data import blocks as blocks_mod
from colossus.data import tokenizer as tokenizer_mod
from colossus.errors import ConfigError

SMALL = 200_000
CODE = 'def f(x, y=2):\n    """Doc: naïve."""\n\treturn {"a": x ** y}  # done\n\n\n'


@pytest.fixture(scope="module")
def stdlib_docs() -> tuple[list[str], list[str]]:
    return load_documents(DataConfig(max_chars=SMALL))


@pytest.fixture(scope="module")
def bpe(stdlib_docs):
    return train_tokenizer(stdlib_docs[0], "bpe", 512)


@pytest.fixture(scope="module")
def wordpiece(stdlib_docs):
    return train_tokenizer(stdlib_docs[0], "wordpiece", 512)


def _write_files(root: Path, n: int, suffix: str = ".txt") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"doc{i:03d}{suffix}"
        p.write_text(f"document number {i}\n" + "word " * (i + 1))
        paths.append(p)
    return paths


# ---- corpus ---------------------------------------------------------------------------------


def test_stdlib_files_excludes_tests_and_is_sorted():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert files == stdlib_files()
    banned = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    assert not [r for r in rel if banned & set(r.split("/"))]
    assert all(r.endswith(".py") for r in rel)
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= set(rel)
    assert len(files) > 300
    assert sum(f.stat().st_size for f in files) > 3_000_000


def test_stdlib_split_is_deterministic_and_respects_max_chars(stdlib_docs):
    train, val = stdlib_docs
    assert load_documents(DataConfig(max_chars=SMALL)) == (train, val)
    assert sum(map(len, train)) + sum(map(len, val)) == SMALL
    assert train and val
    # val holds roughly its fraction of the text, not one tiny file
    assert 0.02 < sum(map(len, val)) / SMALL < 0.2


def test_split_is_disjoint_and_stable_on_files(tmp_path):
    paths = _write_files(tmp_path / "c", 60)
    cfg = DataConfig(corpus=[str(p) for p in paths], val_fraction=0.2)
    train, val = load_documents(cfg)
    everything = {p.read_text() for p in paths}
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == everything
    assert 2 <= len(val) < 30
    assert load_documents(cfg) == (train, val)
    # the split is by document name: reversing the file list keeps every document's side
    rev_train, rev_val = load_documents(cfg.model_copy(update={"corpus": cfg.corpus[::-1]}))
    assert set(rev_val) == set(val) and set(rev_train) == set(train)


def test_split_val_fraction_zero_and_minimum(tmp_path):
    paths = [str(p) for p in _write_files(tmp_path, 2)]
    train, val = load_documents(DataConfig(corpus=paths, val_fraction=0.0))
    assert len(train) == 2 and val == []
    train, val = load_documents(DataConfig(corpus=paths, val_fraction=0.01))
    assert len(train) == 1 and len(val) == 1


def test_max_chars_truncates_last_document(tmp_path):
    paths = [str(p) for p in _write_files(tmp_path, 10)]
    train, val = load_documents(DataConfig(corpus=paths, max_chars=50, val_fraction=0.0))
    full = [Path(p).read_text() for p in paths]
    assert sum(map(len, train)) == 50
    assert train[:-1] == full[: len(train) - 1]
    assert full[len(train) - 1].startswith(train[-1]) and train[-1] != full[len(train) - 1]


def test_jsonl_loading(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"body": f"text {i}", "id": i} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    train, val = load_documents(DataConfig(corpus=str(p), text_field="body", val_fraction=0.0))
    assert train == [f"text {i}" for i in range(5)] and val == []


@pytest.mark.parametrize(
    "bad_line, expect",
    [("{not json", "not valid JSON"), ('{"other": "x"}', "no field 'body'"), ("[1, 2]", "object")],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, expect):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "ok"}\n' + bad_line + "\n")
    with pytest.raises(ConfigError) as ei:
        load_documents(DataConfig(corpus=str(p), text_field="body"))
    assert f"{p}:2" in str(ei.value) and expect in str(ei.value)


def test_globs_and_home_expansion(tmp_path, monkeypatch):
    a = _write_files(tmp_path / "a", 3)
    b = _write_files(tmp_path / "b" / "deep", 2, suffix=".md")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = DataConfig(corpus=["~/a/*.txt", str(tmp_path / "**" / "*.md")], val_fraction=0.0)
    train, _ = load_documents(cfg)
    assert train == [p.read_text() for p in a + b]
    # overlapping patterns do not duplicate documents
    train2, _ = load_documents(cfg.model_copy(update={"corpus": [*cfg.corpus, "~/a/doc000.txt"]}))
    assert train2 == train


def test_missing_paths_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="nothing-here.txt"):
        load_documents(DataConfig(corpus=str(tmp_path / "nothing-here.txt")))
    _write_files(tmp_path, 1)
    with pytest.raises(ConfigError, match=r"\*\.zzz"):
        load_documents(DataConfig(corpus=[str(tmp_path / "*.txt"), str(tmp_path / "*.zzz")]))
    with pytest.raises(ConfigError, match="directory"):
        load_documents(DataConfig(corpus=str(tmp_path)))


def test_corpus_fingerprint_tracks_files_and_settings(tmp_path):
    paths = _write_files(tmp_path, 3)
    cfg = DataConfig(corpus=str(tmp_path / "*.txt"))
    fp = corpus_fingerprint(cfg)
    assert fp == corpus_fingerprint(cfg)
    assert fp != corpus_fingerprint(cfg.model_copy(update={"max_chars": 10}))
    assert fp != corpus_fingerprint(cfg.model_copy(update={"val_fraction": 0.5}))
    paths[0].write_text("changed and longer than before, so the size differs")
    assert fp != corpus_fingerprint(cfg)


# ---- tokenizers -----------------------------------------------------------------------------


def test_bpe_round_trips_code_and_reloads(bpe, stdlib_docs, tmp_path):
    from transformers import AutoTokenizer

    assert len(bpe) == 512
    assert bpe.eos_token == bpe.bos_token == bpe.pad_token == "<|endoftext|>"
    ids = bpe.encode(CODE)
    assert bpe.eos_token_id not in ids  # no special tokens added to plain text
    assert bpe.decode(ids) == CODE
    val_doc = stdlib_docs[1][0]
    assert bpe.decode(bpe.encode(val_doc)) == val_doc
    assert len(ids) < len(CODE)  # it learned merges
    bpe.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(val_doc) == bpe.encode(val_doc)
    assert again.eos_token_id == bpe.eos_token_id and again.pad_token == bpe.pad_token


def test_wordpiece_has_bert_specials(wordpiece, tmp_path):
    from transformers import AutoTokenizer

    for name in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(wordpiece, f"{name}_token") == f"[{name.upper()}]"
        assert getattr(wordpiece, f"{name}_token_id") is not None
    ids = wordpiece.encode("return value")
    assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
    assert wordpiece.unk_token_id not in ids
    assert wordpiece.decode(ids, skip_special_tokens=True) == "return value"
    wordpiece.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(CODE) == wordpiece.encode(CODE)
    assert again.mask_token_id == wordpiece.mask_token_id


def test_get_tokenizer_caches_and_reuses(tmp_path, monkeypatch, stdlib_docs):
    cfg = DataConfig(max_chars=SMALL, tokenizer={"vocab_size": 300})
    tok = get_tokenizer(cfg, "causal_lm", stdlib_docs[0], tmp_path)
    (cached,) = [p for p in (tmp_path / "tokenizers").iterdir() if not p.name.startswith(".")]
    assert (cached / "tokenizer.json").is_file() and len(tok) == 300

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", no_training)
    again = get_tokenizer(cfg, "causal_lm", stdlib_docs[0], tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    # masked_lm defaults to WordPiece: a different cache entry, so it must train
    with pytest.raises(AssertionError, match="trained again"):
        get_tokenizer(cfg, "masked_lm", stdlib_docs[0], tmp_path)


def test_get_tokenizer_from_path(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "tok")
    cfg = DataConfig(tokenizer={"path": str(tmp_path / "tok")})
    assert get_tokenizer(cfg, "causal_lm", [], tmp_path).get_vocab() == bpe.get_vocab()
    cfg = DataConfig(tokenizer={"path": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="missing"):
        get_tokenizer(cfg, "causal_lm", [], tmp_path)


# ---- packed blocks --------------------------------------------------------------------------


def test_packed_blocks_content_and_shape(bpe, stdlib_docs, tmp_path):
    docs = stdlib_docs[0]
    blocks = build_packed_blocks(docs, bpe, 64, tmp_path, "k")
    stream = []
    for d in docs:
        stream += bpe.encode(d, add_special_tokens=False) + [bpe.eos_token_id]
    n = len(stream) // 64
    assert len(blocks) == n > 100
    assert blocks.block_size == 64 and blocks.path.parent == tmp_path
    assert blocks.path.name.startswith("blocks-") and blocks.path.suffix == ".bin"
    assert np.fromfile(blocks.path, dtype=np.uint16).size == n * 64
    got = torch.stack([blocks[i] for i in range(len(blocks))])
    assert got.dtype == torch.long and got.shape == (n, 64)
    assert got.flatten().tolist() == stream[: n * 64]
    assert torch.equal(blocks[-1], got[-1])
    assert torch.equal(blocks[torch.tensor(2)], got[2])  # Trainer indexes with randperm items
    with pytest.raises(IndexError):
        blocks[n]
    # a pickled copy (DataLoader worker) reopens the file rather than carrying the array
    clone = pickle.loads(pickle.dumps(blocks))
    assert torch.equal(clone[3], blocks[3])


def test_packed_blocks_wordpiece_joins_with_sep(wordpiece, tmp_path):
    docs = ["alpha beta", "gamma delta"] * 20
    blocks = build_packed_blocks(docs, wordpiece, 8, tmp_path, "wp")
    flat = torch.cat([blocks[i] for i in range(len(blocks))]).tolist()
    assert wordpiece.cls_token_id not in flat
    first = wordpiece.encode("alpha beta", add_special_tokens=False)
    assert flat[: len(first) + 1] == first + [wordpiece.sep_token_id]


def test_packed_blocks_cache_is_reused(bpe, stdlib_docs, tmp_path, monkeypatch):
    docs = stdlib_docs[0]
    first = build_packed_blocks(docs, bpe, 64, tmp_path, "k")
    mtime = first.path.stat().st_mtime_ns

    def no_tokenizing(*a, **k):
        raise AssertionError("re-tokenized instead of using the cache")

    monkeypatch.setattr(blocks_mod, "_write_stream", no_tokenizing)
    second = build_packed_blocks(docs, bpe, 64, tmp_path, "k")
    assert second.path == first.path and first.path.stat().st_mtime_ns == mtime
    assert torch.equal(second[5], first[5])
    # another block size or key is another cache entry
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_packed_blocks(docs, bpe, 32, tmp_path, "k")
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_packed_blocks(docs, bpe, 64, tmp_path, "other")


def test_packed_blocks_too_few_tokens(bpe, tmp_path):
    with pytest.raises(ConfigError, match=r"corpus has \d+ tokens, fewer than block_size=4096"):
        build_packed_blocks(["x = 1"], bpe, 4096, tmp_path, "tiny")
    assert not list(tmp_path.glob("blocks-*"))  # nothing half-written left behind


# ---- collators ------------------------------------------------------------------------------


def test_causal_collator():
    rows = [torch.arange(8), torch.arange(8, 16)]
    batch = CausalLMCollator()(rows)
    assert torch.equal(batch["input_ids"], torch.stack(rows))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    assert torch.equal(batch["attention_mask"], torch.ones(2, 8, dtype=torch.long))


def _mlm_batch(tok, n: int = 256, t: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    first_plain = max(tok.all_special_ids) + 1  # ordinary tokens only, specials placed below
    ids = torch.randint(first_plain, len(tok), (n, t), generator=g)
    ids[:, 0] = tok.cls_token_id
    ids[:, 60] = tok.sep_token_id
    ids[:, 100] = tok.pad_token_id
    return ids


def test_mlm_collator_masking_statistics(wordpiece):
    coll = MaskedLMCollator(wordpiece, mlm_probability=0.15)
    ids = _mlm_batch(wordpiece)
    torch.manual_seed(0)
    out = coll(list(ids))
    special = torch.isin(ids, torch.tensor(wordpiece.all_special_ids))
    chosen = out["labels"] != -100
    rate = chosen[~special].float().mean().item()
    assert 0.14 < rate < 0.16
    assert not chosen[special].any()
    assert torch.equal(out["input_ids"][special], ids[special])  # specials never touched
    assert torch.equal(out["labels"][chosen], ids[chosen])
    masked = out["input_ids"] == wordpiece.mask_token_id
    assert not (masked & ~chosen).any()
    frac_mask = masked[chosen].float().mean().item()
    frac_keep = (out["input_ids"] == ids)[chosen].float().mean().item()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_keep < 0.12
    assert torch.equal(out["token_type_ids"], torch.zeros_like(ids))
    assert torch.equal(out["attention_mask"], torch.ones_like(ids))


def test_mlm_collator_is_deterministic_under_seed(wordpiece):
    coll = MaskedLMCollator(wordpiece)
    rows = list(_mlm_batch(wordpiece, n=8))
    torch.manual_seed(123)
    a = coll(rows)
    torch.manual_seed(123)
    b = coll(rows)
    c = coll(rows)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["labels"], c["labels"])


def test_mlm_collator_masks_at_least_one(wordpiece):
    coll = MaskedLMCollator(wordpiece, mlm_probability=1e-6)
    for seed in range(5):
        torch.manual_seed(seed)
        out = coll([torch.tensor([wordpiece.cls_token_id, 50, 60, 70, wordpiece.sep_token_id])])
        assert (out["labels"] != -100).sum() == 1
        assert out["labels"][0, 0] == -100 and out["labels"][0, -1] == -100


def test_mlm_collator_needs_mask_token(bpe):
    with pytest.raises(ConfigError, match="mask token"):
        MaskedLMCollator(bpe)


# ---- build_data -----------------------------------------------------------------------------


def test_build_data_causal_trains_a_model_step(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = DataConfig(max_chars=SMALL, block_size=32, tokenizer={"vocab_size": 512})
    data = build_data(cfg, "causal_lm", cache_root=tmp_path)
    assert isinstance(data, DataBundle) and isinstance(data.collator, CausalLMCollator)
    assert isinstance(data.train, PackedBlocks) and isinstance(data.eval, PackedBlocks)
    assert len(data.train) > 10 * len(data.eval) > 0
    assert data.train.path != data.eval.path
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=len(data.tokenizer))
    )
    loss = model(**data.collator([data.train[0], data.train[1]])).loss
    assert torch.isfinite(loss) and abs(loss.item() - np.log(len(data.tokenizer))) < 1.0


def test_build_data_masked_lm_defaults(tmp_path, monkeypatch):
    from transformers import BertConfig, BertForMaskedLM

    monkeypatch.chdir(tmp_path)  # cache_root defaults to cfg.cache_dir, relative to the cwd
    cfg = DataConfig(max_chars=SMALL, block_size=32, tokenizer={"vocab_size": 512})
    data = build_data(cfg, "masked_lm")
    assert (tmp_path / cfg.cache_dir / "tokenizers").is_dir()
    assert isinstance(data.collator, MaskedLMCollator)
    assert data.tokenizer.mask_token == "[MASK]"
    sep_id = data.tokenizer.sep_token_id
    assert (torch.cat([data.train[i] for i in range(len(data.train))]) == sep_id).any()
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=len(data.tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )
    torch.manual_seed(0)
    assert torch.isfinite(model(**data.collator([data.train[0], data.train[1]])).loss)
    with pytest.raises(ConfigError, match="task"):
        build_data(cfg, "seq2seq")


def test_build_data_without_val(tmp_path):
    cfg = DataConfig(max_chars=SMALL, val_fraction=0.0, tokenizer={"vocab_size": 300})
    assert build_data(cfg, "causal_lm", cache_root=tmp_path).eval is None


def _rank_worker(cache_root: str, out: str) -> None:
    torch.set_num_threads(1)
    cfg = DataConfig(max_chars=SMALL, block_size=32, tokenizer={"vocab_size": 700})
    data = build_data(cfg, "masked_lm", cache_root=cache_root)
    Path(out).write_text(
        json.dumps(
            {
                "val": load_documents(cfg)[1],
                "vocab": data.tokenizer.get_vocab(),
                "train": str(data.train.path),
                "first": data.train[0].tolist(),
            }
        )
    )


def test_concurrent_ranks_share_one_cache(tmp_path):
    # WordPiece training is not deterministic, so without the lock two ranks could end up with
    # different vocabularies; with it they must agree exactly. Fresh interpreters also have
    # fresh hash() salts, so this checks the split does not depend on them.
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"rank{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_rank_worker, args=(str(tmp_path), str(o))) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    a, b = (json.loads(o.read_text()) for o in outs)
    assert a == b
    assert a["val"] == load_documents(DataConfig(max_chars=SMALL))[1]
    assert len(list((tmp_path / "tokenizers").glob("[!.]*"))) == 1
    assert not [p for p in tmp_path.rglob("*tmp*") if p.exists()]
    assert os.path.getsize(a["train"]) > 0
