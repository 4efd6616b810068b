"""The model-family contract (engine.family): each family declares itself once, and nothing outside
``engine/models/`` switches on a family.

The structural check reads the source with ``ast``: outside the model files, no comparison against
a registered ``model_type`` (``x == "gpt2"``, ``t in ("vit", "deit")``), no ``isinstance`` against a
model class, no import of a model module. What differs between families lives in their contracts,
and the rest of the house switches on a family's ``kind`` at most.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from trifuse import engine
from trifuse.engine.decoding import OPTIONS, Decoding
from trifuse.engine.family import DECODER, KINDS, PROTOCOLS, SEQ2SEQ, CausalDecoder, Family, Model, conformance
from trifuse.engine.registry import FAMILY_MODULES, families, family_for, family_of

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE_MODELS = [p for d in ("engine", "export", "bench", "trifuse") for p in sorted((ROOT / d).rglob("*.py"))
                  if "models" not in p.relative_to(ROOT).parts]

def test_every_family_declares_a_complete_contract():
    import transformers

    assert [f.name for f in families()] and len(families()) == len(FAMILY_MODULES)
    for fam in families():
        assert isinstance(fam, Family) and fam.kind in KINDS
        assert fam.protocol is PROTOCOLS[fam.kind]
        assert set(fam.config_defaults) == set(fam.model_types), fam.name
        for task, cls in fam.hf_classes.items():
            assert hasattr(transformers, cls), (fam.name, task, cls)
        for name, cfg in fam.named_sizes.items():
            assert cfg["model_type"] in fam.model_types, (fam.name, name)
        for cls in fam.model_classes:
            assert conformance(cls, fam.protocol) == [], fam.name  # names, properties and signatures
            if fam.kind in (DECODER, SEQ2SEQ):
                assert issubclass(cls, Decoding), fam.name  # one decoding front-end for every decoder
        for t in fam.model_types:
            assert family_for(t) is fam


def _smallest_size(fam) -> dict:
    import transformers

    def size(cfg):
        c = transformers.AutoConfig.for_model(**cfg)
        return c.hidden_size * c.num_hidden_layers

    return min(fam.named_sizes.values(), key=size)


@pytest.mark.parametrize("fam", families(), ids=lambda f: f.name)
def test_a_built_model_satisfies_its_kinds_protocol(fam):
    """The same check on a model from_pretrained builds: the data members (``config``, ``task``, the
    heads, the decoder stack) set in ``__init__`` too, and ``isinstance`` against the runtime protocol."""
    from trifuse.bench.suite import build_hf_named

    cfg = _smallest_size(fam)
    task, auto = next(iter(fam.hf_classes.items()))
    hf = build_hf_named("size", {"size": cfg}, torch.float32, torch.device("cpu"), "eager", auto)
    model = engine.from_pretrained(hf, dtype=torch.float32, device="cpu")
    assert model.task == task and model.model_type == cfg["model_type"]
    assert isinstance(model, fam.protocol) and isinstance(model, Model)
    assert conformance(model, fam.protocol) == []
    for other in set(PROTOCOLS.values()) - {fam.protocol}:
        assert conformance(model, other), (fam.name, other.__name__)  # the kinds are told apart


def test_the_conformance_check_bites():
    """A class lacking one member, a method with a different signature, a method where a property is
    promised: each is named. (Data members set in ``__init__`` are checked on built models only.)"""
    from trifuse.engine.family import _members
    from trifuse.engine.models.gpt2 import GPT2Model

    for protocol in PROTOCOLS.values():
        members = {k: v for k, v in _members(protocol).items() if v is not None}
        assert conformance(type("Full", (), members), protocol) == [], protocol.__name__
        for name in members:
            partial = type("Partial", (), {k: v for k, v in members.items() if k != name})
            assert conformance(partial, protocol) == [f"{name}: missing"], (protocol.__name__, name)
    assert conformance(object, CausalDecoder)  # nothing at all
    wrong = {
        "decode_step": lambda self, tokens, slot, cache: None,  # a parameter short, in the wrong place
        "export_forward": lambda self, input_ids, attention_mask, cache, past_length, layers: None,
        "start_decoding": lambda self, input_ids, mask, num_beams, max_new_tokens: None,
        "new_cache": lambda self, batch: None,
    }
    broken = type("Broken", (GPT2Model,), {**wrong, "has_lm_head": lambda self: True,
                                           "cache_shape": property(lambda self: (1, 1, 1))})
    problems = conformance(broken, CausalDecoder)
    assert {p.split(":")[0] for p in problems} == set(wrong) | {"has_lm_head", "cache_shape"}, problems
    assert "decode_step: parameter 2 should be 'positions'" in problems
    assert "export_forward: requires 'layers', which callers do not pass" in problems
    assert "start_decoding: takes no keyword 'start_token'" in problems
    assert "has_lm_head: a method, but the protocol promises a property" in problems
    assert "cache_shape: not a method" in problems


def test_one_generate_signature_for_every_decoder():
    """generate/stream are engine.decoding's, not a family's: same options everywhere."""
    for fam in families():
        for cls in fam.model_classes:
            if fam.kind in (DECODER, SEQ2SEQ):
                assert cls.generate is Decoding.generate and cls.stream is Decoding.stream, fam.name
    assert {"num_beams", "repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "num_return_sequences",
            "length_penalty", "early_stopping", "top_k", "top_p", "temperature", "eos_token_id"} <= set(OPTIONS)


def test_family_of_and_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(TypeError, match="is not a trifuse model"):
        family_of(torch.nn.Linear(2, 2))
    (tmp_path / "config.json").write_text('{"model_type": "nope"}')
    save_file({"w": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="unsupported model_type 'nope'; trifuse supports bert, roberta"):
        engine.from_pretrained(tmp_path)


def _switches(path: Path, model_types: set, class_names: set) -> list:
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def literal_types(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & model_types
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literal_types(e) for e in node.elts)) if node.elts else set()
        return set()

    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                hit = literal_types(side)
                if hit:
                    found.append(f"{where} compares with {sorted(hit)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", None) for n in ast.walk(node.args[1])}
            if names & class_names:
                found.append(f"{where} isinstance against {sorted(names & class_names)}")
        elif isinstance(node, ast.ImportFrom) and node.module and ".models" in f".{node.module}":
            found.append(f"{where} imports {node.module}")
        elif isinstance(node, ast.Dict):
            hit = set().union(*(literal_types(k) for k in node.keys if k is not None)) if node.keys else set()
            if hit:
                found.append(f"{where} a table keyed by {sorted(hit)}")
    return found


def test_nothing_outside_the_model_files_switches_on_a_family():
    model_types = {t for f in families() for t in f.model_types}
    class_names = {c.__name__ for f in families() for c in f.model_classes}
    found = [s for p in OUTSIDE_MODELS for s in _switches(p, model_types, class_names)]
    assert not found, "\n".join(found)


def test_the_structural_check_bites(tmp_path):
    bad = tmp_path / "_switch_probe.py"  # scanned as if it were part of the house
    bad.write_text('from trifuse.engine.models.gpt2 import GPT2Model\n'
                   'def f(m, t):\n'
                   '    if t in ("vit", "deit"):\n        return 1\n'
                   '    return isinstance(m, GPT2Model) or {"t5": 1}\n')
    found = _switches(bad, {"vit", "deit", "t5"}, {"GPT2Model"})
    assert sorted(found) == sorted([
        "_switch_probe.py:1 imports trifuse.engine.models.gpt2",
        "_switch_probe.py:3 compares with ['deit', 'vit']",
        "_switch_probe.py:5 isinstance against ['GPT2Model']",
        "_switch_probe.py:5 a table keyed by ['t5']",
    ]), found


def test_adding_a_family_section_names_three_files():
    """docs/adding-a-family.md lists what the contract makes true: at most three files."""
    text = (ROOT / "docs" / "adding-a-family.md").read_text()
    section = text.split("## The three files", 1)[1].split("\n## ", 1)[0]
    files = [line for line in section.splitlines() if line.startswith(("1. ", "2. ", "3. ", "4. "))]
    assert len(files) == 3, files
    assert "engine/models/" in files[0] and "tests/" in files[1] and "FAMILY_MODULES" in files[2]
    assert inspect.getsource(Family)  # the contract it points to exists
