"""llmtap: an observability sidecar for local LLM servers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmtap")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
