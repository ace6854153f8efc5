"""The stand-in against the installed ttnn: every function, class, enum and method the backend uses exists,
takes the parameters we pass by the names (and positions) we pass them, and computes what ttnn's own golden
functions compute. The list comes from the stand-in itself (ttnn_standin.API), so the two cannot drift.

Needs ttnn (Python 3.10/3.12: scripts/setup_ttnn_env.sh); skipped elsewhere.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
import torch

from tests.workers.model import ttnn_standin
from tests.workers.model.ttnn_standin import API, CONSTANTS, METHODS, Device, Standin

ttnn = pytest.importorskip("ttnn", reason="needs ttnn (Python 3.10/3.12; scripts/setup_ttnn_env.sh)")
pytestmark = pytest.mark.ttnn


def resolve(name: str) -> Any:
    obj = ttnn
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def real_signatures(obj: Any) -> list[list[tuple[str, str]]]:
    """Each overload's parameters as (name, kind), kind one of positional, keyword, varpos, varkw; self dropped."""
    target = getattr(obj, "function", obj)  # ttnn operations wrap a nanobind function
    candidates = [target, type(target).__call__] + ([target.__init__] if isinstance(target, type) else [])
    for candidate in candidates:
        signatures = getattr(candidate, "__nb_signature__", None)
        if signatures:
            return [_parse(text) for text, *_ in signatures]
    signature = inspect.signature(target)  # a Python function or class
    kinds = {inspect.Parameter.KEYWORD_ONLY: "keyword", inspect.Parameter.VAR_KEYWORD: "varkw",
             inspect.Parameter.VAR_POSITIONAL: "varpos"}
    return [[(p.name, kinds.get(p.kind, "positional")) for p in signature.parameters.values()]]


def _parse(text: str) -> list[tuple[str, str]]:
    inside = text[text.index("(") + 1 : text.rindex(")")] if "->" not in text else text[text.index("(") + 1 : text.rindex(") ->")]
    params, depth, current = [], 0, ""
    for char in inside:
        depth += char in "[(" and 1 or (char in "])" and -1 or 0)
        if char == "," and depth == 0:
            params.append(current.strip())
            current = ""
        else:
            current += char
    params.append(current.strip())
    out, kind = [], "positional"
    for param in (p.replace("\\*", "*") for p in params if p.strip()):
        name = re.split(r"[:=]", param)[0].strip()
        if name == "*":
            kind = "keyword"
        elif name.startswith("**"):
            out.append((name.lstrip("*"), "varkw"))
        elif name.startswith("*"):
            out.append((name.lstrip("*"), "varpos"))
            kind = "keyword"
        elif name not in ("self", "/"):
            out.append((name, kind))
    return out


def ours(fn: Any) -> tuple[list[str], list[str]]:
    """The stand-in's positional and keyword-only parameter names (its first parameter is the stand-in)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return ([p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD],
            [p.name for p in params if p.kind == p.KEYWORD_ONLY])


def accepts(real: list[tuple[str, str]], positional: list[str], keywords: list[str]) -> bool:
    real_positional = [name for name, kind in real if kind == "positional"]
    if real_positional[: len(positional)] != positional:
        return False
    named = {name for name, kind in real if kind in ("positional", "keyword")}
    return all(k in named for k in keywords) or any(kind == "varkw" for _, kind in real)


@pytest.mark.parametrize("name", sorted(API))
def test_every_call_exists_with_our_parameters(name):
    obj = resolve(name)
    positional, keywords = ours(API[name])
    overloads = real_signatures(obj)
    assert any(accepts(real, positional, keywords) for real in overloads), (
        f"ttnn.{name}: we pass positional {positional} and keywords {keywords}; ttnn has {overloads}")


@pytest.mark.parametrize("name", CONSTANTS)
def test_every_constant_exists(name):
    resolve(name)


@pytest.mark.parametrize("cls, method", [(c, m) for c, methods in METHODS.items() for m in methods])
def test_every_method_exists(cls, method):
    assert callable(getattr(resolve(cls), method))


def test_the_parser_reads_keyword_only_and_overloads():
    linear = real_signatures(ttnn.linear)
    assert ("bias", "keyword") in linear[0] and linear[0][0] == ("input_tensor_a", "positional")
    assert len(real_signatures(ttnn.MeshShape)) == 3
    assert not accepts(linear[0], ["input_tensor_a", "input_tensor_b"], ["no_such_parameter"])


# --- the stand-in computes what ttnn's golden functions compute --------------------------------------

def run(op: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    standin = Standin()
    device = Device()

    def put(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            dtype = "uint32" if not x.is_floating_point() else "bfloat16"
            return ttnn_standin.from_torch(standin, x, dtype, layout="TILE", device=device)
        return x

    target = standin
    for part in op.split("."):
        target = getattr(target, part)
    out = target(*map(put, args), **{k: put(v) for k, v in kwargs.items()})
    return ttnn_standin.to_torch(standin, out).float()


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).to(torch.bfloat16).float()


GEN = torch.Generator().manual_seed(0)


def test_elementwise_ops_match_golden():
    x, w, b = bf16(1, 1, 32, 64), bf16(1, 1, 64, 96), bf16(1, 1, 1, 96)
    golden = ttnn.linear.golden_function(x, w, bias=b)
    assert torch.allclose(run("linear", x, w, bias=b), golden, atol=3e-2, rtol=1e-2)
    gamma = bf16(64)
    golden = ttnn.rms_norm.golden_function(x, gamma, epsilon=1e-5)
    assert torch.allclose(run("rms_norm", x, epsilon=1e-5, weight=gamma.reshape(1, 1, 2, 32)), golden.float(),
                          atol=3e-2, rtol=1e-2)
    table, ids = bf16(1, 1, 100, 64), torch.randint(0, 100, (1, 32), generator=GEN)
    golden = ttnn.embedding.golden_function(ids, table.reshape(100, 64))
    assert torch.equal(run("embedding", ids, table).reshape(golden.shape), golden)


def test_rotary_embedding_matches_golden_row_by_row():
    x, cos, sin = bf16(1, 4, 32, 64), bf16(1, 1, 32, 64), bf16(1, 1, 32, 64)
    got = run("experimental.rotary_embedding", x, cos, sin)
    golden = torch.cat([ttnn.experimental.rotary_embedding.golden_function(x[:, :, t : t + 1], cos, sin, t)
                        for t in range(32)], dim=2)
    assert torch.allclose(got, golden, atol=3e-2, rtol=1e-2)


def test_fill_cache_and_attention_match_golden():
    cache, x = torch.zeros(1, 2, 128, 32), bf16(1, 2, 32, 32)
    golden = ttnn.fill_cache.golden_function(cache.clone(), x, 0, update_idx=64)
    assert torch.equal(run("fill_cache", cache, x, 0, update_idx=64), golden)
    q, k, v = bf16(1, 4, 32, 32), bf16(1, 2, 128, 32), bf16(1, 2, 128, 32)
    mask = torch.where(torch.arange(128)[None, :] <= torch.arange(40, 72)[:, None], 0.0, -1e9)[None, None]
    golden = ttnn.transformer.scaled_dot_product_attention.golden_function(
        q, k, v, attn_mask=mask, is_causal=False, scale=0.2)
    got = run("transformer.scaled_dot_product_attention", q, k, v, attn_mask=mask, is_causal=False, scale=0.2)
    assert torch.allclose(got, golden, atol=3e-2, rtol=1e-2)
