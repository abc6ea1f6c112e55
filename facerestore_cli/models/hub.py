"""Hub-hosted model files, fetched through `huggingface_hub` and nothing else.

Its cache, its locking, its resume of a dropped connection (HTTP Range), its progress bars and
its environment variables (`HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`)
are huggingface_hub's own behaviour; this module only turns its errors into one line a user can
act on. huggingface_hub reads those variables when it is first imported, so it is imported here
lazily, inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from facerestore_cli.errors import FacerestoreError


class DownloadError(FacerestoreError):
    """A hub file that could not be had; the message is one line."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The hub cache huggingface_hub uses (`HF_HUB_CACHE`, else `HF_HOME`/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo_id: str, filename: str) -> Path | None:
    """The file when it is already in the hub cache (never touches the network), else None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) and Path(found).exists() else None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors, whichever client this huggingface_hub uses."""
    for module in ("httpx2", "httpx"):
        try:
            return (__import__(module).HTTPError,)
        except (ImportError, AttributeError):
            continue
    return ()


def hub_download(repo_id: str, filename: str) -> Path:
    """Download `filename` of `repo_id` into the hub cache (or find it there) and return its path."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{filename}"
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        if _offline():
            raise DownloadError(
                f"{where}: HF_HUB_OFFLINE is set and the file is not in the hub cache ({cache_dir()}); unset it to download"
            ) from None
        raise DownloadError(
            f"{where}: cannot reach {constants.ENDPOINT} and the file is not in the hub cache ({_first_line(err)})"
        ) from None
    except GatedRepoError:
        raise DownloadError(
            f"{where}: the repository is gated; accept its terms on the hub and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{where}: no such repository at {constants.ENDPOINT} (or it is private)") from None
    except (RemoteEntryNotFoundError, RevisionNotFoundError):
        raise DownloadError(f"{where}: the repository has no such file (it may have moved; see the repository page)") from None
    except HfHubHTTPError as err:
        raise DownloadError(f"{where}: the hub answered {_first_line(err)}; run the same command again to retry") from None
    except (OSError, ValueError, *_transport_errors()) as err:  # type: ignore[misc]
        raise DownloadError(
            f"{where}: download failed ({type(err).__name__}: {_first_line(err)}); run the same command again to retry"
        ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
