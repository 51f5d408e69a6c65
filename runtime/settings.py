"""`Settings`: how a runtime runs, in one object built once (from Python, from the command line, or from an
artifact directory's manifest) and passed to every component that needs it.

    Settings(backend="inductor", max_seq_len=4096, batch_sizes=(1, 8), artifacts="artifacts/20b")

Fields left as None take, in order: the value recorded in the artifacts' manifest (when `artifacts` holds one
for this rank), then the default below. `resolve` does that once; everything downstream sees concrete values.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from gptoss.graph import ArtifactDir, get_backend
from gptoss.graph.shapes import WINDOW_CACHES
from gptoss.model.ops import attention_skips_unseen_slots

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FORMATS = ("published", "dense")
DEFAULTS = {"backend": "eager", "max_batch_size": 8, "max_seq_len": 4096, "prefill_chunk": 256,
            "interleave_chunk": 256, "window_cache": "ring", "mixed_steps": False}
COMPILED = ("all", "decode")  # which entry points a compiling backend builds graphs for


@dataclass(frozen=True)
class Settings:
    backend: str | None = None  # a name in graph.BACKENDS; default: the artifacts' backend, else "eager"
    device: str | None = None  # default: the backend's first device (cpu for eager/inductor, npu for torchair)
    dtype: str | None = None  # default: the artifacts' dtype, else float32 on CPU, bfloat16 on accelerators
    weights: str | None = None  # "published" (as in the checkpoint) or "dense"; default: the artifacts', else
    #                             published on CPU, dense elsewhere
    max_batch_size: int | None = None
    max_seq_len: int | None = None
    prefill_chunk: int | None = None  # tokens per prefill step (a power of two)
    min_prefill_chunk: int | None = None  # the smallest first-chunk graph (a power of two). Default: 16, or 1
    #                                       where prompts run eagerly (no graphs to build: a prompt is not padded)
    prefill_granule: int | None = None  # a prompt's first/last chunk rounds up to a multiple of this (a power of
    #                                     two; 0: to a power of two). Default: min_prefill_chunk where prompts run
    #                                     eagerly (less padding costs nothing), else 0 (fewer graphs)
    interleave_chunk: int | None = None  # serving: prompt tokens prefilled per step while others decode (power of 2)
    mixed_steps: bool | None = None  # serving: such a chunk and the decode step as one graph (default False).
    #                                  Costs a cache row and a graph per batch x kv_len; saves a weight pass
    batch_sizes: tuple[int, ...] | None = None  # batch buckets to build graphs for; default powers of two
    compiled: str | None = None  # inductor: "all" entry points (the default on accelerators) or "decode" only (on
    #                              CPU): prefill chunks and mixed steps then run eagerly (no prompt graphs to build,
    #                              prompts padded only to the granule) while decode steps, where eager's Python costs
    #                              most, replay graphs
    window_cache: str | None = None  # "ring": sliding layers keep only their window (default); "full": max_seq_len
    kv_buckets: bool | None = None  # attention reads a power of two of cache slots that covers the context (a graph
    #                                 per kv_len); False: the whole cache every step. Default: False where the op
    #                                 table's attention costs only the slots a query sees (the torch table's CPU
    #                                 kernels, fp32 on CPU), True elsewhere
    tp_size: int | None = None  # tensor-parallel size; default WORLD_SIZE (1 outside torchrun)
    artifacts: str | None = None  # artifact root directory (graphs built once, loaded by later processes)
    rebuild: bool = False  # wipe and rebuild artifacts built for something else
    compile_missing: bool = True  # compile when the artifact directory is empty (False: refuse)
    progress: bool = True  # progress bar while compiling
    threads: int | None = None  # CPU threads; default: the artifacts' count (inductor bakes it in), else torch's
    dist_timeout_s: float | None = None  # collective timeout under tensor parallelism
    keep_host_memory: bool = True  # CPU: malloc keeps freed memory for the next step (model.host_memory)
    mmap: bool = True  # CPU, published weights: the MXFP4 experts and the embedding used in place from the mapped
    #                    checkpoint (the page cache's pages, no copy; the files must not change meanwhile); False:
    #                    copied into the process (model.loader)

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.weights is not None and self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights {self.weights!r}: choose 'published' or 'dense'")
        if self.window_cache is not None and self.window_cache not in WINDOW_CACHES:
            raise ValueError(f"window_cache {self.window_cache!r}: choose one of {', '.join(WINDOW_CACHES)}")
        if self.compiled is not None and self.compiled not in COMPILED:
            raise ValueError(f"compiled {self.compiled!r}: choose one of {', '.join(COMPILED)}")
        for name in ("mixed_steps", "kv_buckets"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.backend is not None:
            get_backend(self.backend)  # an unknown name fails here, listing the known ones
        if self.device is not None:
            object.__setattr__(self, "device", str(self.device))
        if self.batch_sizes is not None:
            object.__setattr__(self, "batch_sizes", tuple(int(b) for b in self.batch_sizes))
        if self.artifacts is not None:
            object.__setattr__(self, "artifacts", str(self.artifacts))
        if self.prefill_granule is not None and (
                not isinstance(self.prefill_granule, int) or isinstance(self.prefill_granule, bool)
                or self.prefill_granule < 0 or self.prefill_granule & (self.prefill_granule - 1)):
            raise ValueError(f"prefill_granule must be 0 or a power of two, got {self.prefill_granule!r}")
        for name in ("max_batch_size", "max_seq_len", "prefill_chunk", "min_prefill_chunk", "interleave_chunk",
                     "tp_size", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    def replace(self, **changes) -> "Settings":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolve(self, tp_size: int = 1, rank: int = 0) -> "Settings":
        """Concrete values for every field: what was set, else the artifacts' manifest, else the defaults."""
        recorded = {}
        if self.artifacts is not None:
            manifest = ArtifactDir(self.artifacts, tp_size, rank).read()
            if manifest is not None:
                key = manifest.key
                shapes = key.get("shapes", {})
                recorded = {"backend": key.get("backend"), "dtype": key.get("dtype"), "weights": key.get("weights"),
                            "max_batch_size": shapes.get("max_batch_size"), "max_seq_len": shapes.get("max_seq_len"),
                            "prefill_chunk": shapes.get("prefill_chunk"), "min_prefill_chunk": shapes.get("min_chunk"),
                            "interleave_chunk": shapes.get("interleave_chunk"),
                            "batch_sizes": tuple(shapes["batch_sizes"]) if "batch_sizes" in shapes else None,
                            "window_cache": shapes.get("window_cache"), "mixed_steps": shapes.get("mixed"),
                            "prefill_granule": shapes.get("granule", 0),
                            "kv_buckets": shapes.get("kv_buckets", True) if shapes else None,
                            "compiled": key.get("compiled", "all"),
                            "threads": key.get("threads")}
        values = {}
        if self.max_batch_size is None and self.batch_sizes is not None:
            recorded["max_batch_size"] = max(self.batch_sizes)  # the buckets asked for set the largest batch
        for name, value in self.to_dict().items():
            if value is None:
                value = recorded.get(name)
            if value is None:
                value = DEFAULTS.get(name)
            values[name] = value
        backend = get_backend(values["backend"])
        values["device"] = values["device"] or backend.devices[0]
        device_type = torch.device(values["device"]).type
        backend.check_device(device_type)
        if values["compiled"] is None:
            # CPU prompts run eagerly: a chunk computes for tens to hundreds of ms, where a graph saves nothing (a
            # 256-token chunk of the bench checkpoint took the same time either way), while a graph per chunk length
            # means padding each prompt's last chunk to a power of two (up to ~2x its work: the load test's prompts
            # computed 21% padding; served 1.18-1.25x the tokens/s unpadded, BENCHMARKS.md session 43). Accelerators
            # keep every entry point compiled (not measured against eager there: each eager op is a launch).
            values["compiled"] = "decode" if backend.name == "inductor" and device_type == "cpu" else "all"
        if values["compiled"] != "all" and backend.name != "inductor":
            raise ValueError(f"compiled={values['compiled']!r} is an inductor option; backend '{backend.name}' "
                             f"{'compiles every entry point' if backend.compiles else 'compiles nothing'}")
        prompts_compiled = backend.compiles and values["compiled"] == "all"
        if values["min_prefill_chunk"] is None:  # prompts run eagerly: unpadded (padding tokens route to experts
            #                                       too: gpt-oss-20b took 1.6-2.4 s for a 1-token prompt padded to 16)
            values["min_prefill_chunk"] = 16 if prompts_compiled else 1
        if values["prefill_granule"] is None:  # prompts run eagerly: more chunk lengths cost nothing
            values["prefill_granule"] = values["min_prefill_chunk"] if not prompts_compiled else 0
        if values["dtype"] is None:  # CPUs without bf16 matrix units run fp32 far faster; accelerators run bf16
            values["dtype"] = "float32" if device_type == "cpu" else "bfloat16"
        # CPU: weights as published (MXFP4 experts, bf16 matrices) through the CPU kernels of the torch op table;
        # accelerators and other op tables: dense
        cpu_kernels = device_type == "cpu" and backend.ops == "torch"
        values["weights"] = values["weights"] or ("published" if cpu_kernels else "dense")
        if values["weights"] == "published" and not cpu_kernels:
            raise ValueError(f"weights='published' runs on CPU with the torch op table (its kernels are CPU "
                             f"kernels); backend '{backend.name}' on '{device_type}' needs weights='dense'")
        if values["kv_buckets"] is None:  # buckets buy nothing where attention skips the slots a query does not see
            values["kv_buckets"] = not attention_skips_unseen_slots(backend.ops, device_type, DTYPES[values["dtype"]])
        values["tp_size"] = values["tp_size"] or tp_size
        return Settings(**values)
