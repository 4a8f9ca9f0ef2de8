"""The C++ host (``cpp/``) from Python through its C API: for ``dspark bench`` and the tests, not for serving.

``load_library`` declares the C API of ``libdspark.so``; ``CppGenerator`` drives an engine step by step with the
surface of ``dspark.runtime.generate.Generator`` that a closed loop needs (``submit``/``step``/``has_work``,
``max_batch``, ``clock``, sequences with ``generated``, ``done``, ``first_token_at``, ``accepted``, ``verified``
and ``stats()``), so the C++ host can be timed the same way as the Python runtime.
"""

from __future__ import annotations

import ctypes
import json
import time
from pathlib import Path

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.generate import RoundClock


class CRequest(ctypes.Structure):
    """``dspark_request`` of cpp/include/dspark/dspark.h."""

    _fields_ = [("prompt_ids", ctypes.POINTER(ctypes.c_int64)), ("prompt_len", ctypes.c_size_t),
                ("max_new_tokens", ctypes.c_int), ("temperature", ctypes.c_double), ("top_p", ctypes.c_double),
                ("top_k", ctypes.c_int), ("seed", ctypes.c_uint64), ("ignore_eos", ctypes.c_int),
                ("stop", ctypes.POINTER(ctypes.c_char_p)), ("stop_count", ctypes.c_size_t)]


class COptions(ctypes.Structure):
    """``dspark_options`` of cpp/include/dspark/dspark.h."""

    _fields_ = [("use_draft", ctypes.c_int), ("num_draft_tokens", ctypes.c_int), ("max_batch", ctypes.c_int),
                ("threads", ctypes.c_int), ("verify_sha256", ctypes.c_int), ("backend", ctypes.c_char_p),
                ("provider", ctypes.c_char_p), ("lookup", ctypes.c_int), ("scheduler", ctypes.c_char_p),
                ("block_schedule", ctypes.c_char_p), ("threshold", ctypes.c_double)]


class CClock(ctypes.Structure):
    """``dspark_clock`` of cpp/include/dspark/dspark.h."""

    _fields_ = [("rounds", ctypes.c_int64), ("round_s", ctypes.c_double), ("draft_s", ctypes.c_double),
                ("verify_s", ctypes.c_double)]


def load_library(path: str | Path) -> ctypes.CDLL:
    """``libdspark.so`` with every C API function's argument and result types declared."""
    path = Path(path)
    if not path.is_file():
        raise DsparkError(f"C++ host library not found: {path} (build it: see the README's C++ host section)")
    lib = ctypes.CDLL(str(path))
    vp, size, i64p = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int64)
    signatures = {
        "dspark_last_error": (ctypes.c_char_p, []),
        "dspark_open": (vp, [ctypes.c_char_p, vp]),
        "dspark_close": (None, [vp]),
        "dspark_encode": (ctypes.c_long, [vp, ctypes.c_char_p, i64p, size]),
        "dspark_generate": (vp, [vp, vp, size, ctypes.c_int, vp, vp]),
        "dspark_results_count": (size, [vp]),
        "dspark_results_tokens": (i64p, [vp, size, ctypes.POINTER(size)]),
        "dspark_results_json": (ctypes.c_char_p, [vp, size]),
        "dspark_results_trace": (ctypes.c_char_p, [vp, size]),
        "dspark_results_free": (None, [vp]),
        "dspark_submit": (ctypes.c_int64, [vp, vp, ctypes.c_int]),
        "dspark_step": (ctypes.c_int, [vp]),
        "dspark_has_work": (ctypes.c_int, [vp]),
        "dspark_request_tokens": (i64p, [vp, ctypes.c_int64, ctypes.POINTER(size), ctypes.POINTER(ctypes.c_int)]),
        "dspark_request_json": (ctypes.c_char_p, [vp, ctypes.c_int64]),
        "dspark_request_trace": (ctypes.c_char_p, [vp, ctypes.c_int64]),
        "dspark_release": (None, [vp, ctypes.c_int64]),
        "dspark_set_max_batch": (ctypes.c_int, [vp, ctypes.c_int]),
        "dspark_num_draft_tokens": (ctypes.c_int, [vp]),
        "dspark_read_clock": (ctypes.c_int, [vp, vp]),
        "dspark_tokenizer_open": (vp, [ctypes.c_char_p]),
        "dspark_tokenizer_encode": (ctypes.c_long, [vp, ctypes.c_char_p, i64p, size]),
        "dspark_tokenizer_decode": (vp, [vp, i64p, size]),
        "dspark_tokenizer_close": (None, [vp]),
        "dspark_free_string": (None, [vp]),
    }
    for name, (result, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = result, args
    return lib


def c_request(request, keep: list) -> CRequest:
    """A ``dspark_request`` for a ``dspark.runtime.generate.Request``; ``keep`` holds the memory it points at."""
    ids = (ctypes.c_int64 * len(request.prompt_ids))(*request.prompt_ids)
    stops = (ctypes.c_char_p * len(request.stop))(*[s.encode() for s in request.stop])
    keep += [ids, stops]
    s = request.sampling
    return CRequest(ids, len(request.prompt_ids), request.max_new_tokens, s.temperature, s.top_p, s.top_k,
                    request.seed, int(request.ignore_eos), stops, len(request.stop))


class CppSequence:
    """A request running in the C++ host; refreshed by ``CppGenerator.step``."""

    def __init__(self, request):
        self.request = request
        self.generated: list[int] = []
        self.first_token_at: float | None = None
        self.done = False
        self.result: dict | None = None  # the `dspark generate --json` object, once done
        self.trace: list[dict] = []

    @property
    def finish_reason(self) -> str | None:
        return self.result["finish_reason"] if self.result else None

    @property
    def text(self) -> str:
        return self.result["text"] if self.result else ""

    def stats(self) -> dict:
        return self.result["stats"]

    # per-round draft counts, as the Python Sequence has them (from the trace, which CppGenerator always asks for)
    @property
    def accepted(self) -> list[int]:
        return [r["accepted"] for r in self.trace]

    @property
    def verified(self) -> list[int]:
        return [r["verify_length"] for r in self.trace]


class CppGenerator:
    """A C++ host engine over ``bundle_dir``, stepped from Python."""

    def __init__(self, library: str | Path, bundle_dir: str | Path, use_draft: bool = True,
                 num_draft_tokens: int | None = None, threads: int = 0, max_batch: int | None = None, lookup: int = 0,
                 scheduler: str = "auto", threshold: float = 0.5, block_schedule: str = "off"):
        self.lib = load_library(library)
        self.bundle = Bundle.open(bundle_dir)
        # Bundle.open has checked the files already; NULL backend and provider are ONNX Runtime on the CPU
        options = COptions(int(use_draft), num_draft_tokens or 0, max_batch or 0, threads, 0, None, None, lookup,
                           scheduler.encode(), block_schedule.encode(), threshold)
        self.engine = self.lib.dspark_open(str(self.bundle.path).encode(), ctypes.byref(options))
        if not self.engine:
            raise DsparkError(self.lib.dspark_last_error().decode())
        self.running: dict[int, CppSequence] = {}
        self._max_batch = max_batch or self.bundle.limits.max_batch
        self._clock_start = self._read_clock()

    def close(self) -> None:
        if self.engine:
            self.lib.dspark_close(self.engine)
            self.engine = None

    def __del__(self):
        self.close()

    @property
    def draft_length(self) -> int:
        return self.lib.dspark_num_draft_tokens(self.engine)

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        if self.lib.dspark_set_max_batch(self.engine, value) != 0:
            raise DsparkError(self.lib.dspark_last_error().decode())
        self._max_batch = value

    def _read_clock(self) -> RoundClock:
        clock = CClock()
        if self.lib.dspark_read_clock(self.engine, ctypes.byref(clock)) != 0:
            raise DsparkError(self.lib.dspark_last_error().decode())
        return RoundClock(clock.rounds, clock.round_s, clock.draft_s, clock.verify_s)

    @property
    def clock(self) -> RoundClock:
        """The engine's rounds since the clock was last set, as ``Generator.clock``."""
        now, start = self._read_clock(), self._clock_start
        return RoundClock(now.rounds - start.rounds, now.round_s - start.round_s, now.draft_s - start.draft_s,
                          now.verify_s - start.verify_s)

    @clock.setter
    def clock(self, _fresh: RoundClock) -> None:
        """Assigning a fresh clock starts counting afresh, as with ``Generator.clock``."""
        self._clock_start = self._read_clock()

    def has_work(self) -> bool:
        return bool(self.lib.dspark_has_work(self.engine))

    def submit(self, request) -> CppSequence:
        keep: list = []
        handle = self.lib.dspark_submit(self.engine, ctypes.byref(c_request(request, keep)), 1)
        if handle < 0:
            raise DsparkError(self.lib.dspark_last_error().decode())
        seq = CppSequence(request)
        self.running[handle] = seq
        return seq

    def step(self) -> list[CppSequence]:
        if self.lib.dspark_step(self.engine) < 0:
            raise DsparkError(self.lib.dspark_last_error().decode())
        now = time.perf_counter()
        finished = []
        for handle, seq in list(self.running.items()):
            count, done = ctypes.c_size_t(), ctypes.c_int()
            tokens = self.lib.dspark_request_tokens(self.engine, handle, ctypes.byref(count), ctypes.byref(done))
            if count.value and seq.first_token_at is None:
                seq.first_token_at = now
            seq.generated = tokens[: count.value]
            if done.value:
                seq.result = json.loads(self.lib.dspark_request_json(self.engine, handle))
                seq.trace = [json.loads(line) for line in self.lib.dspark_request_trace(self.engine, handle).splitlines()]
                seq.done = True
                self.lib.dspark_release(self.engine, handle)
                del self.running[handle]
                finished.append(seq)
        return finished
