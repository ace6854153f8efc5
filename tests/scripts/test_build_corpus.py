"""scripts/build_corpus.py on fake site directories: licences, exclusions, deduplication, split, listings.

No network and no pip: installs are faked."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", SCRIPT)
bc = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = bc  # dataclasses look their module up while the script runs
_spec.loader.exec_module(bc)


def make_site(root: Path, name: str, version: str, headers: list[str], files: dict[str, str | bytes]) -> Path:
    site = root / "site" / name
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(parents=True)
    metadata = ["Metadata-Version: 2.4", f"Name: {name}", f"Version: {version}", *headers]
    (dist_info / "METADATA").write_text("\n".join(metadata) + "\n\nA description.\n")
    for path, content in files.items():
        target = site / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return site


def metadata(*headers: str):
    return bc.Parser().parsestr("\n".join(["Name: pkg", "Version: 1.0", *headers]) + "\n\n")


CODE = "def f(x):\n    return x + 1\n"


# --- licences -------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers, licence", [
    (["License-Expression: MIT"], "MIT"),
    (["License-Expression: MIT OR AFL-2.1"], "MIT OR AFL-2.1"),
    (["License-Expression: (GPL-3.0-only OR BSD-3-Clause)"], "(GPL-3.0-only OR BSD-3-Clause)"),
    (["License: BSD 3-Clause License"], "BSD-3-Clause"),
    (["License: Apache 2.0"], "Apache-2.0"),
    (["License: MIT OR AFL-2.1"], "MIT OR AFL-2.1"),
    (["Classifier: License :: OSI Approved :: Apache Software License"], "Apache-2.0"),
    (["License: UNKNOWN", "Classifier: License :: OSI Approved :: ISC License (ISCL)"], "ISC"),
    (["Classifier: License :: OSI Approved :: Python Software Foundation License"], "PSF-2.0"),
    # a whole licence text pasted into License is not trusted; the classifier decides
    (["License: Copyright (c) someone\n        Permission is hereby granted, free of charge, to any person",
      "Classifier: License :: OSI Approved :: MIT License"], "MIT"),
    # the expression wins over a classifier
    (["License-Expression: BSD-2-Clause", "Classifier: License :: OSI Approved :: MIT License"], "BSD-2-Clause"),
])
def test_permissive_licences_are_read_from_metadata(headers: list[str], licence: str) -> None:
    assert bc.licence_of(metadata(*headers)) == licence


@pytest.mark.parametrize("headers", [
    ["License-Expression: GPL-3.0-or-later"],
    ["License-Expression: MIT AND GPL-3.0-only"],
    ["License-Expression: LGPL-2.1-only"],
    ["License: GPL"],
    ["License: MPL 2.0"],
    ["Classifier: License :: OSI Approved :: GNU General Public License v3 (GPLv3)"],
    ["Classifier: License :: OSI Approved :: MIT License",
     "Classifier: License :: OSI Approved :: GNU General Public License v2 (GPLv2)"],
    [],
])
def test_other_licences_stop_the_build(headers: list[str]) -> None:
    with pytest.raises(SystemExit, match="pkg: .*(allow-list|names no licence)"):
        bc.licence_of(metadata(*headers))


def test_a_gpl_package_is_refused_when_loaded(tmp_path: Path) -> None:
    site = make_site(tmp_path, "gplthing", "1.0", ["License: GPL-3.0"], {"gplthing/__init__.py": CODE})
    with pytest.raises(SystemExit, match="gplthing: licence 'GPL-3.0' is not in the allow-list"):
        bc.load_package("gplthing==1.0", site)


def test_load_package_checks_the_pinned_version(tmp_path: Path) -> None:
    site = make_site(tmp_path, "thing", "2.0", ["License-Expression: MIT"], {"thing/__init__.py": CODE})
    with pytest.raises(SystemExit, match="not thing==1.0"):
        bc.load_package("thing==1.0", site)


# --- dependency closure ---------------------------------------------------------------------------


FAKE_REQUIRES = {
    "app-a": ["Lib_D>=1", "lib-e[fast]"],
    "lib-e": ["lib-f; extra == 'fast'", "lib-g; extra == 'slow'", "lib-h; python_version < '3'"],
    "lib-f": [],
    "lib-h": [],
    "typing-extensions": [],
    "colorama": [],
}


def fake_requires(name: str) -> list[str] | None:
    return FAKE_REQUIRES.get(name)


def test_closure_follows_runtime_requirements_and_requested_extras_only() -> None:
    roots = ["App_A>=1", "pytest-thing; extra == 'test'", "colorama; sys_platform == 'win32'",
             "typing_extensions"]
    names, missing = bc.dependency_closure(roots, fake_requires)
    # extras-only requirements are skipped unless the extra was asked for; platform markers are not
    assert names == {"app-a", "lib-d", "lib-e", "lib-f", "lib-h", "colorama", "typing-extensions"}
    assert missing == {"lib-d"}


def test_a_listed_package_in_the_closure_stops_the_build() -> None:
    names, _ = bc.dependency_closure(["app-a"], fake_requires)
    with pytest.raises(SystemExit, match="lib-e: a dependency of specpipe"):
        bc.check_not_excluded(["toolz", "Lib_E"], names)
    bc.check_not_excluded(["toolz", "attrs"], names)  # no clash: returns quietly


def test_the_real_exclusions_cover_specpipe_dependencies_and_test_tooling() -> None:
    excluded = bc.excluded_names()
    assert {"click", "msgpack", "pyzmq", "torch", "transformers", "openai", "fastapi", "uvicorn",
            "prometheus-client", "requests", "numpy", "jinja2", "pytest", "pluggy"} <= excluded
    pinned = {bc.parse_pin(pin)[0] for pin in bc.PACKAGES}
    assert not pinned & excluded
    assert bc.HELDOUT <= pinned


# --- file selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("path, content, reason", [
    ("pkg/core.py", CODE, None),
    ("pkg/attestation.py", CODE, None),  # "test" inside a name is not a test directory
    ("pkg/contest/rules.py", CODE, None),
    ("pkg/tests/helpers.py", CODE, "tests"),
    ("pkg/sub/test/data.py", CODE, "tests"),
    ("pkg/testing/fixtures.py", CODE, "tests"),
    ("pkg/test_core.py", CODE, "tests"),
    ("pkg/conftest.py", CODE, "tests"),
    ("pkg/_vendor/requests/api.py", CODE, "vendored"),
    ("pkg/big.py", "x = 1\n" * 70_000, "too large"),
    ("pkg/table.py", "# This file is automatically generated by tools/gen.py\nTABLE = [1, 2]\n", "generated"),
    ("pkg/pb2.py", '"""\n\n\n# DO NOT EDIT\n"""\nX = 1\n', "generated"),
    ("pkg/late.py", "\n" * 5 + "# do not edit below this line\n" + CODE, None),  # only the first 5 lines count
    ("pkg/blob.py", "DATA = '" + "ab" * 300 + "'\n", "generated"),  # average line over 200 characters
    ("pkg/tz.py", '"""Timezone definitions generated from the Olson database."""\n' + CODE, None),
    ("pkg/__init__.py", "\n", "empty"),
    ("pkg/latin.py", b"x = '\xe9'\n", "not utf-8"),
])
def test_exclusion_reasons(path: str, content: str | bytes, reason: str | None) -> None:
    data = content if isinstance(content, bytes) else content.encode()
    assert bc.exclusion_reason(path, data, max_bytes=400_000) == reason


def test_python_files_skip_dist_info_and_bin(tmp_path: Path) -> None:
    site = make_site(tmp_path, "thing", "1.0", ["License-Expression: MIT"], {
        "thing/__init__.py": CODE, "thing/sub/mod.py": CODE, "thing/data.json": "{}", "single.py": CODE,
        "bin/thing.py": CODE, "thing-1.0.data/scripts/x.py": CODE,
    })
    (site / "thing-1.0.dist-info" / "extra.py").write_text(CODE)
    assert bc.python_files(site) == ["single.py", "thing/__init__.py", "thing/sub/mod.py"]


def test_content_hash_ignores_trailing_whitespace_only() -> None:
    assert bc.content_hash(b"a = 1  \nb = 2\t\n") == bc.content_hash(b"a = 1\nb = 2")
    assert bc.content_hash(b"a = 1\n") != bc.content_hash(b"  a = 1\n")


# --- a whole fake corpus --------------------------------------------------------------------------


SHARED = "class Shared:\n    def method(self):\n        return 42\n"


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(bc, "HELDOUT", {"held"})
    trained = make_site(tmp_path, "trained", "1.0", ["License-Expression: MIT"], {
        "trained/__init__.py": "from .a import A\n",
        "trained/a.py": "class A:\n    pass\n",
        "trained/copy_of_shared.py": SHARED.replace("\n", "   \n"),  # same code, trailing spaces
        "trained/again.py": "class A:\n    pass\n",  # duplicate within the package
        "trained/tests/test_a.py": CODE,
    })
    other = make_site(tmp_path, "other-pkg", "0.3", ["Classifier: License :: OSI Approved :: BSD License"], {
        "other_pkg.py": "import os\n",
        "other_pkg_gen.py": "# @generated\nX = 1\n",
    })
    held = make_site(tmp_path, "held", "2.0", ["License: Apache 2.0"], {
        "held/__init__.py": "VERSION = 2\n",
        "held/shared.py": SHARED,
    })
    # held-out listed last: it still keeps the file it shares with a training package
    packages = [bc.load_package("trained==1.0", trained), bc.load_package("other-pkg==0.3", other),
                bc.load_package("held==2.0", held)]
    return packages, bc.collect(packages, max_bytes=400_000)


def test_split_is_by_whole_package(corpus) -> None:
    packages, collection = corpus
    assert {p.name: p.split for p in packages} == {"trained": "train", "other-pkg": "train", "held": "heldout"}
    assert {(f.package.name, f.package.split) for f in collection.files} == {
        ("trained", "train"), ("other-pkg", "train"), ("held", "heldout")}


def test_duplicates_are_dropped_across_the_corpus(corpus) -> None:
    _, collection = corpus
    kept = sorted((f.package.name, f.path) for f in collection.files)
    assert kept == [("held", "held/__init__.py"), ("held", "held/shared.py"), ("other-pkg", "other_pkg.py"),
                    ("trained", "trained/__init__.py"), ("trained", "trained/a.py")]
    assert collection.duplicates == 2  # trained/copy_of_shared.py and trained/again.py
    assert dict(collection.excluded) == {"tests": 1, "generated": 1}
    assert len({f.sha256 for f in collection.files}) == len(collection.files)


def test_manifest_lists_every_kept_file(corpus) -> None:
    _, collection = corpus
    lines = bc.manifest_tsv(collection.files).splitlines()
    assert lines[0] == "package\tversion\tlicence\tsplit\tpath\tsha256\tbytes"
    rows = [line.split("\t") for line in lines[1:]]
    assert rows == sorted(rows)
    assert [r[:5] for r in rows] == [
        ["held", "2.0", "Apache-2.0", "heldout", "held/__init__.py"],
        ["held", "2.0", "Apache-2.0", "heldout", "held/shared.py"],
        ["other-pkg", "0.3", "BSD", "train", "other_pkg.py"],
        ["trained", "1.0", "MIT", "train", "trained/__init__.py"],
        ["trained", "1.0", "MIT", "train", "trained/a.py"],
    ]
    shared = rows[1]
    assert shared[5] == bc.content_hash(SHARED.encode()) and int(shared[6]) == len(SHARED)


def test_packages_tsv_counts_files_and_bytes(corpus) -> None:
    packages, collection = corpus
    lines = bc.packages_tsv(packages, collection.files).splitlines()
    assert lines == [
        "package\tversion\tlicence\tsplit\tfiles\tbytes",
        f"held\t2.0\tApache-2.0\theldout\t2\t{len('VERSION = 2') + 1 + len(SHARED)}",
        "other-pkg\t0.3\tBSD\ttrain\t1\t10",
        f"trained\t1.0\tMIT\ttrain\t2\t{len('from .a import A') + 1 + len('class A:    pass') + 2}",
    ]


def test_copies_go_under_their_split_and_package(corpus, tmp_path: Path) -> None:
    _, collection = corpus
    out = tmp_path / "out"
    (out / "train" / "stale").mkdir(parents=True)
    bc.write_copies(collection.files, out)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.py")) == [
        "heldout/held/held/__init__.py", "heldout/held/held/shared.py", "train/other-pkg/other_pkg.py",
        "train/trained/trained/__init__.py", "train/trained/trained/a.py"]
    assert not (out / "train" / "stale").exists()
    assert (out / "heldout/held/held/shared.py").read_text() == SHARED


# --- install cache --------------------------------------------------------------------------------


def test_install_reuses_the_pinned_version_and_refresh_reinstalls(tmp_path: Path, monkeypatch) -> None:
    calls: list[list[str]] = []

    def fake_pip(command: list[str]) -> subprocess.CompletedProcess:
        calls.append(command)
        target = Path(command[command.index("--target") + 1])
        name, version = command[-1].split("==")
        make_site(target.parent.parent, name, version, ["License-Expression: MIT"], {f"{name}/__init__.py": CODE})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bc.subprocess, "run", fake_pip)
    site = tmp_path / "site" / "thing"
    bc.install("thing==1.0", site, refresh=False)
    assert len(calls) == 1
    assert calls[0][:3] == [sys.executable, "-m", "pip"]
    assert {"--no-deps", "--no-compile", "--only-binary"} <= set(calls[0])
    bc.install("thing==1.0", site, refresh=False)
    assert len(calls) == 1  # cached
    bc.install("thing==1.0", site, refresh=True)
    assert len(calls) == 2
    bc.install("thing==1.1", site, refresh=False)  # another pin: the old install is replaced
    assert len(calls) == 3 and bc.installed_version(site) == "1.1"


# --- prompts --------------------------------------------------------------------------------------


def test_prompts_are_seeded_runs_of_whole_lines_from_long_files() -> None:
    long_file = [f"line_{i} = {i} * {'x' * 20!r}\n" for i in range(200)]
    short_file = ["short = 'never used'\n"] * 10
    prompts = bc.make_prompts([short_file, long_file], count=16, chars=100, seed=7)
    assert prompts == bc.make_prompts([short_file, long_file], count=16, chars=100, seed=7)
    assert prompts != bc.make_prompts([short_file, long_file], count=16, chars=100, seed=8)
    assert len(prompts) == 16
    text = "".join(long_file)
    for prompt in prompts:
        assert prompt.startswith("line_") and prompt.endswith("\n") and prompt in text
        assert 50 <= len(prompt) < 100 + len(max(long_file, key=len))
    with pytest.raises(SystemExit, match="no held-out file"):
        bc.make_prompts([short_file], count=1, chars=100, seed=7)


def test_the_stdlib_trains_less_the_files_the_bundled_target_holds_out(tmp_path: Path) -> None:
    stdlib = tmp_path / "lib"
    for path in ("json/decoder.py", "json/encoder.py", "test/test_json.py", "site-packages/pkg/x.py",
                 "idlelib/editor.py"):
        (stdlib / path).parent.mkdir(parents=True, exist_ok=True)
        (stdlib / path).write_text(CODE + f"# {path}\n")
    package = bc.stdlib_package(stdlib)
    assert (package.name, package.licence, package.split) == ("python-stdlib", "PSF-2.0", "train")
    collection = bc.collect([package], 400_000, frozenset({("python-stdlib", "json/encoder.py")}))
    assert [f.path for f in collection.files] == ["json/decoder.py"]
    assert collection.excluded == {"held out (stdlib)": 1, "tests": 1}  # site-packages and idlelib are not read
