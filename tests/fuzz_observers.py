"""Coverage-guided fuzzing of the dialect observers with atheris (libFuzzer for Python).

    python -m tests.fuzz_observers -runs=20000 -max_len=4096

The first bytes of each input pick the endpoint, the media type and where the body is split;
the rest is the body. The observers must never raise, and the facts they record must not
depend on how the bytes were split. tests/test_fuzz.py runs a bounded number of inputs.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from exporter.protocols import ENDPOINTS
    from exporter.protocols.observe import ResponseObserver
    from exporter.record import RequestRecord

PATHS = sorted(ENDPOINTS)
MEDIA = ["text/event-stream", "application/x-ndjson", "application/json"]


def _facts(path: str, media: str, pieces: list[bytes]) -> tuple[object, ...]:
    record = RequestRecord("POST", path, 0.0)
    record.operation = ENDPOINTS[path].operation
    observer = ResponseObserver(ENDPOINTS[path], record, media)
    for piece in pieces:
        observer.feed(piece, 1.0)
    observer.finish(True)
    return (record.input_tokens, record.output_tokens, record.token_chunks,
            record.unparseable, record.error_type, tuple(record.finish_reasons))


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    path = PATHS[data[0] % len(PATHS)]
    media = MEDIA[data[1] % len(MEDIA)]
    body = data[3:]
    step = data[2] % 17 + 1
    whole = _facts(path, media, [body])
    split = _facts(path, media, [body[i:i + step] for i in range(0, len(body), step)] or [b""])
    if whole != split:
        raise AssertionError(f"facts depend on the split: {whole} != {split}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
