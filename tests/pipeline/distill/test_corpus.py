"""What the draft learns on: each distinct source file once, some held back, windows of the token stream."""

from pathlib import Path

import pytest
import torch

from pipeline.distill import corpus as corpus_module
from pipeline.distill.config import DraftShape
from pipeline.distill.corpus import read_corpus, sample_windows, source_files
from pipeline.distill.train import learning_rate


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_each_distinct_text_once_across_directories_whitespace_aside(tmp_path):
    write(tmp_path / "a" / "one.py", "x = 1\n")
    write(tmp_path / "a" / "sub" / "two.py", "y = 2\n")
    write(tmp_path / "b" / "one_again.py", "x = 1   \n")  # the same text but for trailing spaces
    write(tmp_path / "b" / "empty.py", "\n\n")
    write(tmp_path / "b" / "notes.txt", "not python")
    corpus = read_corpus([tmp_path / "a", tmp_path / "b"])
    assert sorted(corpus.train) == ["x = 1\n", "y = 2\n"]
    assert corpus.validation == corpus.train[:1]  # too few documents to hold one back: it validates on one
    assert corpus.duplicates == 1


def test_some_documents_are_held_back_by_a_hash_of_their_text(tmp_path):
    for i in range(300):
        write(tmp_path / f"m{i}.py", f"value = {i}\n")
    corpus = read_corpus([tmp_path])
    assert 0 < len(corpus.validation) < 20 and len(corpus.train) + len(corpus.validation) == 300
    assert read_corpus([tmp_path]).validation == corpus.validation  # the same split every time


def test_the_default_corpus_is_the_standard_library_without_its_tests(tmp_path, monkeypatch):
    write(tmp_path / "json" / "decoder.py", "a = 1\n")
    write(tmp_path / "test" / "test_json.py", "b = 2\n")
    write(tmp_path / "unittest" / "tests" / "x.py", "c = 3\n")
    write(tmp_path / "site-packages" / "pkg" / "y.py", "d = 4\n")
    monkeypatch.setattr(corpus_module, "standard_library", lambda: tmp_path)
    assert [path.name for path in source_files(tmp_path, skip_tests=True)] == ["decoder.py"]
    assert read_corpus([]).train == ["a = 1\n"]


def test_an_empty_corpus_is_an_error_naming_the_option(tmp_path):
    with pytest.raises(ValueError, match="--corpus"):
        read_corpus([tmp_path])


def test_windows_are_slices_of_the_stream_even_when_it_is_short():
    stream = torch.arange(100, dtype=torch.int32)
    windows = sample_windows(stream, 8, 16, torch.Generator().manual_seed(0))
    assert windows.shape == (8, 16)
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 16)) for row in windows)
    assert sample_windows(torch.arange(5), 2, 16, torch.Generator().manual_seed(0)).shape == (2, 16)


def test_the_draft_shape_follows_from_layers_and_width():
    shape = DraftShape(layers=2, width=256)
    assert (shape.heads, shape.kv_heads, shape.ffn) == (4, 2, 704)  # the bundled draft's shape
    assert (DraftShape(1, 32).heads, DraftShape(1, 32).kv_heads) == (1, 1)
    with pytest.raises(ValueError, match="--width"):
        DraftShape(2, 200).validate()


def test_the_learning_rate_warms_up_then_decays_to_a_tenth():
    assert learning_rate(0, 0.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert learning_rate(10, 0.0, 1.0, warmup=10) == pytest.approx(1.0)
    assert learning_rate(500, 0.5, 1.0, warmup=10) == pytest.approx(0.55)
    assert learning_rate(900, 1.0, 1.0, warmup=10) == pytest.approx(0.1)
    assert learning_rate(999, 3.0, 1.0, warmup=10) == pytest.approx(0.1)  # past the budget: stays at the floor
