"""The keywords our exllama adapters pass, checked against the libraries' own signatures.

exllamav3's ``Generator`` and ``Job`` and exllamav2's dynamic generator and job take ``**kwargs``
and ignore names they do not know, so a keyword a release renamed would change serving without
an error. ``exllama_common.library_keywords`` checks every keyword at load instead. The first
tests run that check on signatures of the libraries' shape (CPU, no library); the ``exllama``
ones run it on the installed releases (``benchmarks/gpu/api_check.sh [VERSION]`` here, in a
minute; ``session.sh``'s tests phase on the GPU machine).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import re
import sys
import types

import pytest

from xllm_jupyter.backends.base import BackendOptions
from xllm_jupyter.backends.exllama_common import ExllamaOptions, library_keywords
from xllm_jupyter.core.errors import EngineError


def options(**overrides) -> ExllamaOptions:
    """ExllamaOptions from the default engine settings with ``overrides``."""
    return ExllamaOptions.from_options(BackendOptions().with_overrides(overrides))


#: engine settings that reach every keyword the adapters can pass (drafting, quantized cache, split)
OPTION_SETS = [{}, {"kv_cache_bits": "q4", "ngram_draft": 3, "gpu_split": [20, 24], "max_batch_size": 64},
               {"tensor_parallel": True, "kv_cache_bits": "4,6", "draft_model_path": "/m/draft"}]


class Swallowing:
    """A constructor shaped like the libraries' generators: named settings, then ``**kwargs`` it ignores."""

    def __init__(self, model, cache, max_batch_size: int = 16, max_chunk_size: int = 2048, **kwargs):
        self.kwargs = kwargs


# --------------------------------------------------------------- library_keywords
def test_a_keyword_the_library_would_swallow_is_an_error_naming_it_and_the_release():
    with pytest.raises(EngineError, match=r"exllamav3 9\.9\.9: Generator takes no 'max_batch'"):
        library_keywords(Swallowing.__init__, {"max_batch": 4, "max_chunk_size": 512}, library="exllamav3 9.9.9",
                         what="Generator")


def test_declared_keywords_pass_unchanged_and_optional_ones_an_older_release_lacks_are_left_out():
    wanted = {"max_batch_size": 4, "max_chunk_size": 512}
    assert library_keywords(Swallowing.__init__, wanted, library="x 1", what="G") == wanted
    kept = library_keywords(Swallowing.__init__, {**wanted, "prefill_cooldown": 0}, library="x 1", what="G",
                            optional=("prefill_cooldown",))
    assert kept == wanted  # (passed on, it would land in **kwargs: harmless there, but we say what is used)


def test_a_declared_optional_keyword_is_kept():
    assert library_keywords(Swallowing.__init__, {"max_chunk_size": 256}, library="x 1", what="G",
                            optional=("max_chunk_size",)) == {"max_chunk_size": 256}


# ------------------------------------------- check_library_api on library-shaped modules
#: ``Job.receive_sample``'s arguments after ``self`` (exllamav3 1.6.3 to 1.6.5)
V3_RECEIVE_SAMPLE = ("logits", "next_token", "next_k_tokens", "next_k_probs", "next_prob", "results",
                     "first_sample_in_sd_batch=True")


def fake_exllamav3(monkeypatch, *, generator_keywords: tuple[str, ...], job_keywords: tuple[str, ...],
                   receive_sample: tuple[str, ...] = V3_RECEIVE_SAMPLE):
    """``exllamav3`` as a module whose classes declare only the given keywords (and swallow the rest)."""

    def constructor(names: tuple[str, ...], name: str = "__init__", rest: str = ", **kwargs"):
        namespace: dict = {}
        exec(f"def {name}(self, {', '.join(names)}{rest}): pass", namespace)  # noqa: S102 - test fixture
        return namespace[name]

    module = types.ModuleType("exllamav3")
    generator = constructor(("model", "cache", "tokenizer", *generator_keywords))
    module.Generator = type("Generator", (), {"__init__": generator})
    module.Job = type("Job", (), {"__init__": constructor(job_keywords),
                                  "receive_sample": constructor(receive_sample, "receive_sample", "")})
    module.Cache = type("Cache", (), {"__init__": constructor(("model", "max_num_tokens", "max_batch_size",
                                                               "max_history", "layer_type"))})
    module.Model = type("Model", (), {"load_gen": constructor(("progressbar", "max_batch_size", "max_chunk_size",
                                                               "tensor_p", "use_per_device"))})
    monkeypatch.setitem(sys.modules, "exllamav3", module)
    quant = types.ModuleType("exllamav3.cache.quant")  # (a quantized K/V cache names its layer type)
    quant.CacheLayer_quant = type("CacheLayer_quant", (), {})
    monkeypatch.setitem(sys.modules, "exllamav3.cache.quant", quant)
    return module


#: the keywords exllamav3 1.6.3 declares for what we pass (1.6.4 added the prefill schedule)
V3_GENERATOR_1_6_3 = ("max_batch_size", "max_chunk_size", "draft_model", "draft_cache", "num_draft_tokens",
                      "ngram_match_min")
V3_JOB = ("input_ids", "max_new_tokens", "sampler", "seed", "stop_conditions", "return_probs", "return_top_tokens",
          "filters", "identifier", "decode_special_tokens")


def test_exllamav3_1_6_3_without_the_prefill_schedule_loads_and_its_generator_is_not_given_it(monkeypatch):
    from xllm_jupyter.backends.exllamav3 import check_library_api, library_generator_kwargs

    module = fake_exllamav3(monkeypatch, generator_keywords=V3_GENERATOR_1_6_3, job_keywords=V3_JOB)
    for overrides in OPTION_SETS:
        check_library_api("exllamav3 1.6.3", options(**overrides))
    kwargs = library_generator_kwargs(module.Generator, options(), None, "exllamav3 1.6.3")
    assert "prefill_cooldown" not in kwargs and "shared_chunk_size" not in kwargs
    assert kwargs["max_chunk_size"] == 2048 and kwargs["max_batch_size"] == 16


def test_exllamav3_with_the_prefill_schedule_is_given_it(monkeypatch):
    from xllm_jupyter.backends.exllamav3 import PREFILL_SETTINGS, library_generator_kwargs

    module = fake_exllamav3(monkeypatch, generator_keywords=(*V3_GENERATOR_1_6_3, "prefill_cooldown",
                                                             "shared_chunk_size"), job_keywords=V3_JOB)
    kwargs = library_generator_kwargs(module.Generator, options(), None, "exllamav3 1.6.5")
    assert {k: kwargs[k] for k in PREFILL_SETTINGS} == PREFILL_SETTINGS


@pytest.mark.parametrize("renamed", ["return_top_tokens", "identifier", "ngram_match_min"])
def test_an_exllamav3_release_that_renamed_a_keyword_is_refused_before_loading(monkeypatch, renamed):
    from xllm_jupyter.backends.exllamav3 import check_library_api

    fake_exllamav3(monkeypatch, generator_keywords=tuple(k for k in V3_GENERATOR_1_6_3 if k != renamed),
                   job_keywords=tuple(k for k in V3_JOB if k != renamed))
    with pytest.raises(EngineError, match=f"exllamav3 7.0.0: .* takes no '{renamed}'"):
        check_library_api("exllamav3 7.0.0", options())


def test_an_exllamav3_release_that_moved_receive_samples_results_is_refused_before_loading(monkeypatch):
    # StreamHeldV3 takes ``results`` by position: a release passing another argument there would fail every step
    from xllm_jupyter.backends.exllamav3 import check_library_api

    moved = ("logits", "next_token", "next_k_tokens", "next_k_probs", "next_prob", "filter_eos", "results")
    fake_exllamav3(monkeypatch, generator_keywords=V3_GENERATOR_1_6_3, job_keywords=V3_JOB, receive_sample=moved)
    with pytest.raises(EngineError, match=r"exllamav3 7\.0\.0: Job\.receive_sample does not take 'results'"):
        check_library_api("exllamav3 7.0.0", options())


def test_stream_held_v2_reads_results_after_filter_eos_as_exllamav2_passes_it():
    from xllm_jupyter.backends.exllama_stream import StreamHeldV2, StreamHeldV3, check_receive_sample

    class JobV2:  # exllamav2 0.3.2's ExLlamaV2DynamicJob.receive_sample
        def receive_sample(self, logits, next_token, next_k_tokens, next_k_probs, next_prob, filter_eos, results,
                           first_sample_in_sd_batch=True):
            pass

    check_receive_sample(JobV2, StreamHeldV2, "exllamav2 0.3.2")
    with pytest.raises(EngineError, match=r"exllamav2 0\.3\.2: JobV2\.receive_sample does not take 'results'"):
        check_receive_sample(JobV2, StreamHeldV3, "exllamav2 0.3.2")


# -------------------------------------------------------------- the installed releases
def require_source(library: str) -> None:
    """Skip unless ``library``'s Python sources are installed (its compiled module need not be)."""
    if importlib.util.find_spec(library) is None:
        pytest.skip(f"{library} is not installed here")


def stand_in_extension(monkeypatch, name: str) -> None:
    """A stand-in for exllamav2's compiled module ``name`` when there is none, for this test only (its loader
    imports it before it would build one): the signatures checked are Python; a kernel called would raise.
    Later tests still find no module by that name, so those needing the real one skip as before."""
    if importlib.util.find_spec(name) is not None:
        return

    def kernel(attribute: str):
        def stood_in(*args, **kwargs):
            raise NotImplementedError(f"{name}.{attribute} is stood in")

        return stood_in

    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__file__ = __file__  # (inspect walks sys.modules and wants a file for each)
    module.__getattr__ = kernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.exllama
@pytest.mark.parametrize("overrides", OPTION_SETS)
def test_the_installed_exllamav3_declares_every_keyword_we_pass(overrides):
    require_source("exllamav3")
    if "exllamav3.ext" not in sys.modules and importlib.util.find_spec("exllamav3_ext") is None:
        # (its loader would compile the kernels for minutes; api_check.sh stands the module in for the session)
        pytest.skip("exllamav3's compiled module is neither built nor stood in (benchmarks/gpu/api_check.sh)")
    from exllamav3 import Generator
    from exllamav3.version import __version__

    from xllm_jupyter.backends.exllamav3 import PREFILL_SETTINGS, check_library_api, library_generator_kwargs

    check_library_api(f"exllamav3 {__version__}", options(**overrides))
    kwargs = library_generator_kwargs(Generator, options(**overrides), None, f"exllamav3 {__version__}")
    if tuple(int(x) for x in re.findall(r"\d+", __version__)[:3]) >= (1, 6, 4):
        assert {k: kwargs[k] for k in PREFILL_SETTINGS} == PREFILL_SETTINGS


@pytest.mark.exllama
@pytest.mark.parametrize("overrides", [{}, {"kv_cache_bits": "q4", "ngram_draft": 3, "max_batch_size": 64}])
def test_the_installed_exllamav2_declares_every_keyword_we_pass(monkeypatch, overrides):
    require_source("exllamav2")
    if "exllamav2.ext" not in sys.modules:
        stand_in_extension(monkeypatch, "exllamav2_ext")
    from exllamav2.version import __version__

    from xllm_jupyter.backends.exllamav2 import check_library_api

    check_library_api(f"exllamav2 {__version__}", options(**overrides))


# ------------------------------------------------------- result dicts, read from the sources
#: result keys ``exllama_results.translate_results`` reads (exllamav2 has no ``error`` stage: its errors raise)
RESULT_KEYS = ("stage", "identifier", "job", "token_ids", "text", "eos", "eos_reason", "prompt_tokens",
               "cached_tokens", "new_tokens", "accepted_draft_tokens", "rejected_draft_tokens", "token_probs",
               "top_k_tokens", "top_k_probs")
GENERATOR_SOURCES = {"exllamav3": ("generator/job.py", "generator/generator.py"),
                     "exllamav2": ("generator/dynamic.py",)}


def library_source(library: str) -> str:
    """The text of the library's generator and job modules (read, not imported: no compiled module needed)."""
    require_source(library)
    root = importlib.util.find_spec(library).submodule_search_locations[0]
    return "\n".join(open(f"{root}/{name}", encoding="utf-8").read() for name in GENERATOR_SOURCES[library])


@pytest.mark.exllama
@pytest.mark.parametrize("library", ["exllamav3", "exllamav2"])
def test_the_installed_generators_emit_every_result_key_we_read(library):
    source = library_source(library)
    keys = RESULT_KEYS + (("error",) if library == "exllamav3" else ())
    assert [key for key in keys if f'"{key}"' not in source] == []


@pytest.mark.exllama
@pytest.mark.parametrize("library", ["exllamav3", "exllamav2"])
def test_every_eos_reason_the_installed_generators_give_has_a_finish_reason(library):
    from xllm_jupyter.backends.exllama_results import EOS_REASONS

    source = library_source(library)
    reasons = set(re.findall(r'eos_reason\s*=\s*"(\w+)"', source)) | set(
        re.findall(r'"eos_reason"\s*:\s*"(\w+)"', source))
    assert "max_new_tokens" in reasons and "stop_token" in reasons  # (the patterns still find them)
    assert reasons - set(EOS_REASONS) == set()
