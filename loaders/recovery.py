"""Decoding failures: which samples DALI's decoder fails on, and how a loader keeps going when one
does mid-run (one implementation, for the train and the eval loader).

A file whose header is sound but whose image data the decoder rejects (a PNG failing its CRC, a JPEG
promising more than its data hold) is found only by decoding it. The error invalidates the DALI
pipeline and names the sample only by its place in the batch, so `DecodingStream` decodes the samples
of the batches in flight one by one on a fresh pipeline with the loader's decoder (CPU or GPU), marks
those that fail (or that can no longer be read, or changed size since the check before training), and
restarts the pipeline at the batch it was about to hand out. A marked sample is replaced by a fixed stand-in
(`SampleGuard`), so batch sizes, step counts and every rank's lockstep stay the same, and the replay
gives the pixels the run would have had if the file had been marked from the start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

from loaders.headers import BadFile, Header, read_header
from loaders.sources import DataError

_log = logging.getLogger(__name__)

_DECODE_BATCH = 32
_DECODE_BATCH_PIXELS = 100_000_000  # decoded pixels per batch (300 MB of RGB): huge images go a few at a time


def _decoder(batch_size: int, num_threads: int, device: str = "cpu", device_id: int | None = None) -> Pipeline:
    # The same graph on either decoder: only the device string (and the GPU for "mixed") differ.
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id if device == "mixed" else None,
        prefetch_queue_depth=1,
        exec_dynamic=True,
    )
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8)
        pipe.set_outputs(fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False))
    pipe.build()
    return pipe


def _dali_reason(err: Exception) -> str:
    """Why DALI's decoder failed, in its own words when it gives any (its "Failed to decode sample #0"
    and "nvImageCodec failure: '#4'" say nothing; the codec's reason went to stderr, e.g. "CRC error")."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = lines[lines.index("encountered:") + 1] if "encountered:" in lines[:-1] else ""
    if not said or said.startswith(("Failed to decode sample", "nvImageCodec failure", "Current pipeline")):
        return "DALI's decoder fails on it: the image data are damaged (the header is fine)"
    return f"DALI's decoder fails on it ({said})"


def decode_failures(
    samples: Sequence,
    headers: Sequence[Header] | None = None,
    *,
    num_threads: int = 1,
    progress: Callable[[int], object] | None = None,
    device: str = "cpu",
    device_id: int | None = None,
) -> dict[int, str]:
    """{index: why} for the samples (encoded bytes, or file paths) that DALI's decoder on `device` ("cpu",
    or "mixed": nvJPEG on GPU `device_id`) fails on. A loader asks with its own decoder, since a file can
    fail on one and not the other.

    A decode error invalidates a DALI pipeline, so samples go through in batches and a failed batch is
    retried one sample at a time on fresh pipelines. `headers` (their sizes) keep a batch under
    _DECODE_BATCH_PIXELS decoded pixels.
    """
    def load(sample) -> np.ndarray:
        return np.fromfile(sample, dtype=np.uint8) if isinstance(sample, str) else np.asarray(sample, dtype=np.uint8)

    groups, group, pixels = [], [], 0
    for index in range(len(samples)):
        size = headers[index].height * headers[index].width if headers is not None else 0
        if group and (len(group) == _DECODE_BATCH or pixels + size > _DECODE_BATCH_PIXELS):
            groups.append(group)
            group, pixels = [], 0
        group.append(index)
        pixels += size
    if group:
        groups.append(group)

    failures: dict[int, str] = {}
    pipe = None
    for group in groups:
        loaded = {}
        for index in group:
            try:
                loaded[index] = load(samples[index])
            except OSError as err:
                failures[index] = f"cannot read it ({type(err).__name__}: {err.strerror or err})"
        batch = [i for i in group if i in loaded]
        pipe = pipe or _decoder(_DECODE_BATCH, num_threads, device, device_id)
        try:
            if batch:
                pipe.feed_input("encoded", [loaded[i] for i in batch])
                pipe.run()
        except RuntimeError:
            pipe = None
            for index in batch:
                pipe = pipe or _decoder(_DECODE_BATCH, num_threads, device, device_id)
                try:
                    pipe.feed_input("encoded", [loaded[index]])
                    pipe.run()
                except RuntimeError as err:
                    failures[index] = _dali_reason(err)
                    pipe = None
        if progress is not None:
            progress(len(group))
    return failures


class SampleGuard:
    """What a loader's feed does about a sample the decoder would fail on (found by the structural check
    on the bytes it just read, or by a DALI decode error): hands over a stand-in instead, so batch sizes,
    and with them every rank's step count, stay the same. Each such sample is logged with its path."""

    def __init__(
        self, source, what: str, rank: int, *, device: str = "cpu", device_id: int | None = None, sizes: np.ndarray | None = None
    ) -> None:
        self.source, self.what, self.rank = source, what, rank
        # The loader's decoder: suspects and the stand-in are decoded on the same kind.
        self.device, self.device_id = device, device_id
        # (height, width) per sample that the loader computes crop windows from: a file whose header
        # says otherwise now was changed since, and is replaced (its window would not fit it).
        self.sizes = sizes
        self.bad: dict[int, str] = {}  # sample index -> why, in the order found
        self._stand_in: tuple[int, np.ndarray, Header] | None = None

    def read(self, index: int) -> tuple[np.ndarray, Header] | None:
        """The sample's bytes and header, or None when it must be replaced."""
        if index in self.bad:
            return None
        try:
            data = self.source.read(index)
            header = read_header(data)
        except (OSError, BadFile, DataError) as err:
            self.mark(int(index), str(err))
            return None
        if self.sizes is not None and tuple(self.sizes[index]) != (header.height, header.width):
            self.mark(int(index), f"changed since the check before training: now {header.width}x{header.height}")
            return None
        return data, header

    def read_bytes(self, index: int) -> np.ndarray | None:
        """The sample's bytes alone (its header was checked before training), or None when it must be replaced."""
        if index in self.bad:
            return None
        try:
            return self.source.read(index)
        except (OSError, DataError) as err:
            self.mark(int(index), str(err))
            return None

    def mark(self, index: int, why: str) -> None:
        if index in self.bad:
            return
        self.bad[index] = why
        _log.warning(
            "bad %s file replaced: %s (%s); %d so far on rank %d",
            self.what, self.source.name(index), why, len(self.bad), self.rank,
        )

    def stand_in(self) -> tuple[int, np.ndarray, Header]:
        """The first sample of the source that passes the check and decodes (a fixed choice: deterministic)."""
        while self._stand_in is None:
            index = next((i for i in range(len(self.source)) if i not in self.bad), None)
            if index is None:
                raise DataError(f"none of the {len(self.source)} {self.what} images can be decoded")
            got = self.read(index)
            if got is None:
                continue
            failed = decode_failures([got[0]], device=self.device, device_id=self.device_id)
            if failed:
                self.mark(index, failed[0])
                continue
            self._stand_in = (index, *got)
        return self._stand_in

    def find_undecodable(self, indices: Sequence[int], error: RuntimeError) -> None:
        """After a DALI decode error: mark the samples among `indices` that fail alone; re-raise if none does."""
        candidates = sorted({int(i) for i in indices if int(i) not in self.bad})
        loaded = {i: got[0] for i in candidates if (got := self.read(i)) is not None}
        failed = decode_failures(list(loaded.values()), device=self.device, device_id=self.device_id)
        if not failed and len(loaded) == len(candidates):
            raise error
        for position, why in failed.items():
            self.mark(list(loaded)[position], why)


class DecodingStream:
    """What a loader's DALI iterator needs to survive a decode error: the train and eval loaders build
    on it. A subclass sets `guard` and `_last_fed` (the flat position of the newest batch its feed
    produced) and says how to start its pipeline, where it stands, and which samples a batch reads."""

    guard: SampleGuard
    _iterator = None  # the DALI iterator; None until started, and after an error
    _last_fed = -1

    def _start_pipeline(self) -> None:
        raise NotImplementedError

    def _next_flat(self) -> int:
        """The flat position (batches counted from the stream's start) of the next batch to hand out."""
        raise NotImplementedError

    def _batch_samples(self, flat: int) -> Sequence[int]:
        """The sample indices the feed reads for the batch at flat position `flat`."""
        raise NotImplementedError

    def _next_output(self) -> dict:
        """The next batch from DALI, recovering from decode errors (DALIGenericIterator decodes its first
        batch while it is built, so starting the pipeline can fail too)."""
        while True:
            try:
                if self._iterator is None:
                    self._start_pipeline()
                return next(self._iterator)[0]
            except RuntimeError as error:  # a file the structural check let through failed to decode
                self._iterator = None
                first = self._next_flat()
                suspects = [i for flat in range(first, max(first, self._last_fed) + 1) for i in self._batch_samples(flat)]
                self.guard.find_undecodable(suspects, error)
