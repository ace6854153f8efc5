"""Builds the licence-clean Python source corpus the draft model is distilled on, split by package.

Each package of PACKAGES (pinned, pure Python, permissively licensed) is installed on its own with
`pip install --no-deps --no-compile --only-binary :all: --target <out>/site/<name>`; an existing install
of the pinned version is reused unless --refresh is given. Its licence is read from the installed
`*.dist-info/METADATA` and the build stops on anything outside ALLOWED_LICENCES. It also stops on a
package in the dependency closure of the installed `specpipe` distribution (or of pytest): the
project's own dependencies must not be in the corpus.

Kept files: the `*.py` files of each package's import packages, without test directories, test files,
vendored copies of other projects, files over --max-bytes and machine-generated files; deduplicated
over the whole corpus by sha256 of the content with trailing whitespace stripped (held-out packages
first, then the rest in list order: the first keeps a file). Whole packages are held out (HELDOUT).
The standard library of this interpreter is one more training package (python-stdlib, PSF), less the
files the bundled target held out (workers/bundled/target/heldout_files.txt), which stay for evaluation.

Outputs:
    <out>/train/<package>/<path>, <out>/heldout/<package>/<path>   copies of the kept files
    <docs>/packages.tsv, <docs>/manifest.tsv                        the listing, committed to the repo
    workers/bundled/heldout_packages_prompts.jsonl                   64 prompts from the held-out packages,
                                                                    made as make_heldout_prompts.py does

    python scripts/build_corpus.py --out /work/corpus    # keep <out> outside the repo
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from email.parser import Parser
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "workers" / "models"

# Held-out packages lead the list so that a file shared with a training package stays held out.
PACKAGES = [
    "attrs==26.1.0",
    "flask==3.1.3",
    "more-itertools==11.2.1",
    "sortedcontainers==2.4.0",
    "prompt-toolkit==3.0.53",
    "arrow==1.4.0",
    "alembic==1.20.1",
    "babel==2.19.0",
    "beautifulsoup4==4.15.0",
    "blinker==1.9.0",
    "boltons==26.2.0",
    "bottle==0.13.4",
    "cachetools==8.0.2",
    "cattrs==26.2.1",
    "decorator==5.3.1",
    "django==5.2.19",
    "dnspython==2.9.2",
    "docopt-ng==0.9.0",
    "html5lib==1.1",
    "humanize==4.17.0",
    "inflect==7.6.0",
    "invoke==3.0.3",
    "ipython==9.18.1",
    "isort==9.0.2",
    "itsdangerous==2.2.0",
    "jedi==0.20.1",
    "jsonschema==4.26.0",
    "lark==1.3.1",
    "mako==1.4.3",
    "markdown==3.11.3",
    "marshmallow==4.4.0",
    "openpyxl==3.1.5",
    "parso==0.8.7",
    "pexpect==4.9.0",
    "pip==26.3",
    "ptyprocess==0.7.0",
    "pycodestyle==2.15.0",
    "pyflakes==4.1.0",
    "pyparsing==3.3.3",
    "python-dateutil==4.0.0",
    "pytz==2026.6",
    "simplejson==4.3.0",
    "six==1.17.0",
    "sphinx==9.0.4",
    "sqlalchemy==2.1.9",
    "sqlparse==0.6.1",
    "tabulate==0.10.0",
    "toolz==1.2.0",
    "tornado==6.6.1",
    "traitlets==5.16.1",
    "twisted==26.10.0",
    "wcwidth==0.9.4",
    "werkzeug==3.1.9",
    "wheel==0.48.0",
]

HELDOUT = {"attrs", "flask", "more-itertools", "sortedcontainers", "prompt-toolkit", "arrow"}

ALLOWED_LICENCES = {"MIT", "BSD", "BSD-2-Clause", "BSD-3-Clause", "Apache-2.0", "PSF-2.0", "ISC", "0BSD"}

# Dependencies of specpipe named explicitly, so the check does not hinge on the installed versions'
# metadata; the closure computed at run time is added to these.
ALWAYS_EXCLUDED = {
    "requests", "urllib3", "idna", "certifi", "charset-normalizer", "tqdm", "pyyaml", "numpy", "jinja2",
    "markupsafe", "sympy", "mpmath", "networkx", "pydantic", "pydantic-core", "starlette", "anyio", "sniffio",
    "httpx", "httpcore", "h11", "typing-extensions", "filelock", "fsspec", "packaging", "setuptools",
    "huggingface-hub", "safetensors", "regex", "rich", "pygments", "markdown-it-py", "mdurl", "tomlkit",
    # test tooling
    "pytest", "pluggy", "iniconfig", "exceptiongroup", "tomli", "colorama",
}
EXCLUSION_ROOTS = ["pytest"]

TEST_DIRS = {"test", "tests", "testing", "idle_test"}
STDLIB = "python-stdlib"  # the standard library, as one more training package
STDLIB_SKIPPED = {"site-packages", "idlelib", "turtledemo", "__phello__"}  # not library code
VENDOR_DIRS = {"_vendor", "vendor", "_vendored", "vendored", "extern", "_extern", "third_party"}
GENERATED = re.compile(
    r"\bauto-?generated\b|\bautomatically generated\b|\b(file|code|module) (is |was )?generated\b"
    r"|^\s*#.*\bgenerated (by|from|with|using)\b|\bdo not edit\b|@generated",
    re.IGNORECASE,
)

# Licence strings and classifiers as packages write them -> SPDX-like identifiers.
LICENCE_ALIASES = {
    "mit": "MIT", "mit license": "MIT", "the mit license": "MIT", "expat": "MIT",
    "bsd": "BSD", "bsd license": "BSD", "new bsd license": "BSD-3-Clause", "modified bsd license": "BSD-3-Clause",
    "bsd-2-clause": "BSD-2-Clause", "bsd 2-clause": "BSD-2-Clause", "bsd 2-clause license": "BSD-2-Clause",
    "simplified bsd": "BSD-2-Clause", "bsd-3-clause": "BSD-3-Clause", "bsd 3-clause": "BSD-3-Clause",
    "bsd 3-clause license": "BSD-3-Clause", "3-clause bsd": "BSD-3-Clause", "3-clause bsd license": "BSD-3-Clause",
    "apache-2.0": "Apache-2.0", "apache 2.0": "Apache-2.0", "apache 2": "Apache-2.0",
    "apache license 2.0": "Apache-2.0", "apache license, version 2.0": "Apache-2.0",
    "apache software license": "Apache-2.0", "apache software license 2.0": "Apache-2.0",
    "psf": "PSF-2.0", "psf-2.0": "PSF-2.0", "python software foundation license": "PSF-2.0",
    "isc": "ISC", "isc license": "ISC", "isc license (iscl)": "ISC", "0bsd": "0BSD",
}


class CorpusError(SystemExit):
    """Stops the build with a message (exit status 1)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"build_corpus: {message}")


@dataclass(frozen=True)
class Package:
    name: str  # PEP 503 normalised
    version: str
    licence: str
    split: str
    site: Path


@dataclass(frozen=True)
class SourceFile:
    package: Package
    path: str  # relative to the package's site dir
    data: bytes
    sha256: str


# --- licences -------------------------------------------------------------------------------------


def read_metadata(site: Path) -> Message:
    dist_infos = sorted(site.glob("*.dist-info"))
    if len(dist_infos) != 1:
        raise CorpusError(f"{site}: expected one *.dist-info, found {len(dist_infos)}")
    return Parser().parsestr((dist_infos[0] / "METADATA").read_text(encoding="utf-8"))


def normalise_licence(text: str) -> str | None:
    """One licence name or SPDX id -> its identifier here, or None when unrecognised."""
    key = " ".join(text.strip().lower().split())
    if key in LICENCE_ALIASES:
        return LICENCE_ALIASES[key]
    return next((spdx for spdx in ALLOWED_LICENCES if spdx.lower() == key), None)


def expression_is_permissive(expression: str) -> bool:
    """An SPDX expression is permissive when some OR-branch has only allowed licences."""
    flat = expression.replace("(", " ").replace(")", " ")
    for branch in re.split(r"\s+OR\s+", flat):
        terms = [re.split(r"\s+WITH\s+", term)[0] for term in re.split(r"\s+AND\s+", branch.strip())]
        if all(normalise_licence(term) in ALLOWED_LICENCES for term in terms):
            return True
    return False


def licence_of(metadata: Message) -> str:
    """The licence a distribution declares: License-Expression, else License, else its classifiers.

    Raises CorpusError when none of them names a licence in ALLOWED_LICENCES."""
    name = metadata.get("Name", "?")
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        if not expression_is_permissive(expression):
            raise CorpusError(f"{name}: licence {expression!r} is not in the allow-list {sorted(ALLOWED_LICENCES)}")
        return expression
    field = (metadata.get("License") or "").strip()
    # Some packages paste the whole licence text in License; only a short name is trusted.
    if field and "\n" not in field and len(field) < 60 and field.upper() != "UNKNOWN":
        spdx = normalise_licence(field)
        if spdx is None and re.search(r"\s(OR|AND)\s", field) and expression_is_permissive(field):
            return field
        if spdx is None:
            raise CorpusError(f"{name}: licence {field!r} is not in the allow-list {sorted(ALLOWED_LICENCES)}")
        return spdx
    classifiers = [c.split("::")[-1].strip() for c in metadata.get_all("Classifier") or []
                   if c.startswith("License ::")]
    if not classifiers:
        raise CorpusError(f"{name}: METADATA names no licence (License-Expression, License or classifier)")
    # Several classifiers are read as all applying: each must be permissive.
    spdx_ids = [normalise_licence(c) for c in classifiers]
    if not all(spdx in ALLOWED_LICENCES for spdx in spdx_ids):
        raise CorpusError(f"{name}: licence classifiers {classifiers} are not all in the allow-list")
    return " AND ".join(sorted(set(spdx for spdx in spdx_ids if spdx)))


# --- exclusions -----------------------------------------------------------------------------------


def installed_requires(name: str) -> list[str] | None:
    """The requirements of an installed distribution; None when it is not installed."""
    try:
        return importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return None


def _follows(requirement: Requirement, extras: set[str]) -> bool:
    """Whether a requirement applies: extras-only ones only for the extras asked for; platform markers
    are ignored (a dependency on any platform counts)."""
    if requirement.marker is None or "extra" not in str(requirement.marker):
        return True
    return any(Marker(str(requirement.marker)).evaluate({"extra": extra}) for extra in extras)


def dependency_closure(roots: Iterable[str],
                       requires: Callable[[str], list[str] | None] = installed_requires) -> tuple[set[str], set[str]]:
    """Normalised names of the root requirements and everything they depend on, plus those that could
    not be followed further (not installed)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    missing: set[str] = set()
    stack = [Requirement(root) for root in roots if _follows(Requirement(root), set())]
    while stack:
        requirement = stack.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        dependencies = requires(name)
        if dependencies is None:
            missing.add(name)
            continue
        stack.extend(r for r in map(Requirement, dependencies) if _follows(r, set(extras)))
    return names, missing


def excluded_names() -> set[str]:
    try:
        roots = importlib.metadata.requires("specpipe") or []
    except importlib.metadata.PackageNotFoundError:
        raise CorpusError("specpipe is not installed; run `pip install -e .` in the repo first") from None
    names, missing = dependency_closure([*roots, *EXCLUSION_ROOTS])
    if missing:
        print(f"note: not installed, dependencies not followed: {', '.join(sorted(missing))}", file=sys.stderr)
    return names | ALWAYS_EXCLUDED


def check_not_excluded(names: Iterable[str], excluded: set[str]) -> None:
    clash = sorted(canonicalize_name(name) for name in names if canonicalize_name(name) in excluded)
    if clash:
        raise CorpusError(f"{', '.join(clash)}: a dependency of specpipe or of its test tooling; "
                          "remove it from PACKAGES")


def exclusion_reason(path: str, data: bytes, max_bytes: int) -> str | None:
    """Why a .py file (path relative to the site dir) is left out, or None to keep it."""
    parts = path.split("/")
    if TEST_DIRS & set(parts[:-1]) or parts[-1].startswith("test_") or parts[-1] == "conftest.py":
        return "tests"
    if VENDOR_DIRS & set(parts[:-1]):
        return "vendored"
    if len(data) > max_bytes:
        return "too large"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not utf-8"
    lines = text.splitlines()
    if not text.strip():
        return "empty"
    if any(GENERATED.search(line) for line in lines[:5]) or len(text) / len(lines) > 200:
        return "generated"
    return None


def content_hash(data: bytes) -> str:
    text = "\n".join(line.rstrip() for line in data.decode("utf-8").splitlines())
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- install and collect --------------------------------------------------------------------------


def parse_pin(pin: str) -> tuple[str, str]:
    name, sep, version = pin.partition("==")
    if not sep or not version:
        raise CorpusError(f"{pin!r}: pins are name==version")
    return canonicalize_name(name), version


def installed_version(site: Path) -> str | None:
    if not site.is_dir():
        return None
    try:
        return read_metadata(site).get("Version")
    except (CorpusError, OSError):
        return None


def install(pin: str, site: Path, refresh: bool) -> None:
    """pip-installs one pinned package alone into site; an install of the same version is reused."""
    _, version = parse_pin(pin)
    if not refresh and installed_version(site) == version:
        return
    shutil.rmtree(site, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-compile", "--only-binary", ":all:", "--target", str(site), pin]
    print(f"installing {pin}", file=sys.stderr)
    if subprocess.run(command).returncode != 0:
        shutil.rmtree(site, ignore_errors=True)
        raise CorpusError(f"pip could not install {pin}")


def load_package(pin: str, site: Path) -> Package:
    name, version = parse_pin(pin)
    metadata = read_metadata(site)
    if canonicalize_name(metadata.get("Name", "")) != name or metadata.get("Version") != version:
        raise CorpusError(f"{site}: holds {metadata.get('Name')} {metadata.get('Version')}, not {pin}")
    split = "heldout" if name in HELDOUT else "train"
    return Package(name=name, version=version, licence=licence_of(metadata), split=split, site=site)


def python_files(site: Path) -> list[str]:
    """*.py files of the package's import packages and top-level modules, relative to site."""
    found = []
    for entry in sorted(site.iterdir()):
        if entry.name.endswith((".dist-info", ".data")) or entry.name in {"bin", "__pycache__", *STDLIB_SKIPPED}:
            continue
        if entry.is_file() and entry.suffix == ".py":
            found.append(entry.name)
        elif entry.is_dir():
            found.extend(p.relative_to(site).as_posix() for p in sorted(entry.rglob("*.py")) if p.is_file())
    return found


def has_compiled(site: Path) -> bool:
    return any(p.suffix in {".so", ".pyd"} for p in site.rglob("*") if p.is_file())


@dataclass
class Collection:
    files: list[SourceFile]
    excluded: Counter[str]
    duplicates: int


def stdlib_package(stdlib: Path) -> Package:
    """This interpreter's standard library (PSF licence) as a training package."""
    return Package(name=STDLIB, version=platform.python_version(), licence="PSF-2.0", split="train", site=stdlib)


def collect(packages: list[Package], max_bytes: int, withheld: frozenset[tuple[str, str]] = frozenset()) -> Collection:
    """Kept files of all packages, deduplicated: held-out packages first, then list order. `withheld`:
    (package, path) pairs kept out, such as the stdlib files the bundled target holds out."""
    ordered = sorted(packages, key=lambda p: p.split != "heldout")  # stable: list order within a split
    kept: list[SourceFile] = []
    hashes: set[str] = set()
    excluded: Counter[str] = Counter()
    duplicates = 0
    for package in ordered:
        for path in python_files(package.site):
            data = (package.site / path).read_bytes()
            reason = "held out (stdlib)" if (package.name, path) in withheld else exclusion_reason(path, data, max_bytes)
            if reason:
                excluded[reason] += 1
                continue
            digest = content_hash(data)
            if digest in hashes:
                duplicates += 1
                continue
            hashes.add(digest)
            kept.append(SourceFile(package=package, path=path, data=data, sha256=digest))
    return Collection(files=kept, excluded=excluded, duplicates=duplicates)


# --- outputs --------------------------------------------------------------------------------------


def write_copies(files: list[SourceFile], out: Path) -> None:
    for split in ("train", "heldout"):
        shutil.rmtree(out / split, ignore_errors=True)
    for file in files:
        target = out / file.package.split / file.package.name / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.data)


def tsv(header: list[str], rows: Iterable[list[object]]) -> str:
    lines = ["\t".join(header)] + sorted("\t".join(map(str, row)) for row in rows)
    return "\n".join(lines) + "\n"


def manifest_tsv(files: list[SourceFile]) -> str:
    return tsv(["package", "version", "licence", "split", "path", "sha256", "bytes"],
               ([f.package.name, f.package.version, f.package.licence, f.package.split, f.path, f.sha256,
                 len(f.data)] for f in files))


def packages_tsv(packages: list[Package], files: list[SourceFile]) -> str:
    counts = Counter(f.package.name for f in files)
    sizes = Counter({p.name: 0 for p in packages})
    for f in files:
        sizes[f.package.name] += len(f.data)
    return tsv(["package", "version", "licence", "split", "files", "bytes"],
               ([p.name, p.version, p.licence, p.split, counts[p.name], sizes[p.name]] for p in packages))


def make_prompts(sources: list[list[str]], count: int, chars: int, seed: int) -> list[str]:
    """Prompts as scripts/make_heldout_prompts.py makes them: runs of whole lines of about `chars`
    characters from a seeded random line of a random file longer than 4 * chars."""
    sources = [lines for lines in sources if sum(map(len, lines)) > 4 * chars]
    if not sources:
        raise CorpusError(f"no held-out file has more than {4 * chars} characters")
    rng = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        lines = rng.choice(sources)
        start = rng.randrange(len(lines))
        prompt = ""
        for line in lines[start:]:
            if len(prompt) >= chars:
                break
            prompt += line
        if len(prompt) >= chars // 2 and prompt.strip():
            prompts.append(prompt)
    return prompts


def heldout_sources(files: list[SourceFile]) -> list[list[str]]:
    held = sorted((f for f in files if f.package.split == "heldout"), key=lambda f: (f.package.name, f.path))
    return [f.data.decode("utf-8").splitlines(keepends=True) for f in held]


def summary(packages: list[Package], collection: Collection) -> str:
    lines = []
    for split in ("train", "heldout"):
        names = [p.name for p in packages if p.split == split]
        files = [f for f in collection.files if f.package.split == split]
        megabytes = sum(len(f.data) for f in files) / 1e6
        lines.append(f"{split}: {len(names)} packages, {len(files)} files, {megabytes:.1f} MB")
    lines.append(f"duplicates dropped: {collection.duplicates}")
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(collection.excluded.items()))
    lines.append(f"excluded files: {sum(collection.excluded.values())} ({reasons})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="corpus directory (site/, train/, heldout/)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "corpus", help="where the TSV listings go")
    parser.add_argument("--prompts-out", type=Path, default=MODELS / "heldout_packages_prompts.jsonl")
    parser.add_argument("--refresh", action="store_true", help="reinstall packages already under <out>/site")
    parser.add_argument("--max-bytes", type=int, default=400_000, help="leave out larger files")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--chars", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="the standard library to train on too, less the bundled target's held-out files")
    parser.add_argument("--no-stdlib", action="store_true", help="leave the standard library out")
    args = parser.parse_args()

    pins = [parse_pin(pin) for pin in PACKAGES]
    if unknown := HELDOUT - {name for name, _ in pins}:
        raise CorpusError(f"held-out packages not in PACKAGES: {sorted(unknown)}")
    check_not_excluded((name for name, _ in pins), excluded_names())

    packages = []
    for pin, (name, _) in zip(PACKAGES, pins):
        site = args.out / "site" / name
        install(pin, site, args.refresh)
        packages.append(load_package(pin, site))
    compiled = [p.name for p in packages if has_compiled(p.site)]
    withheld: frozenset[tuple[str, str]] = frozenset()
    if not args.no_stdlib:
        packages.append(stdlib_package(args.stdlib))
        # the stdlib held-out prompts come from these: they stay out of training
        withheld = frozenset((STDLIB, name) for name in (MODELS / "target" / "heldout_files.txt").read_text().split())

    collection = collect(packages, args.max_bytes, withheld)
    write_copies(collection.files, args.out)
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "packages.tsv").write_text(packages_tsv(packages, collection.files))
    (args.docs / "manifest.tsv").write_text(manifest_tsv(collection.files))
    prompts = make_prompts(heldout_sources(collection.files), args.count, args.chars, args.seed)
    args.prompts_out.write_text("".join(json.dumps(p) + "\n" for p in prompts))

    print(summary(packages, collection))
    if compiled:
        print(f"compiled extensions ignored (only .py files taken): {', '.join(compiled)}")
    print(f"wrote {args.out / 'train'}, {args.out / 'heldout'}, {args.docs}/{{packages,manifest}}.tsv, "
          f"{len(prompts)} prompts to {args.prompts_out}")


if __name__ == "__main__":
    main()
