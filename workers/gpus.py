"""The GPUs this host offers to workers, and the Ollama server each one must call.

Nothing here imports Django or Celery, so the worker launcher can call it before any
settings are loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

SPEC_VARIABLE = "RMASSIMO_GPUS"
URLS_VARIABLE = "OLLAMA_URLS"
OLLAMA_BASE_PORT = 11434

_SPEC_FORMS = (
    f"{SPEC_VARIABLE} must be empty (discover the cards through NVML), "
    f"a number of simulated cards such as '4', '0' or 'none' for no GPU (CPU only), "
    f"or a comma-separated list of card indexes such as '0,2' (write '2,' for card 2 alone), "
    f"where cards joined by '+' form one worker's group, as in '0,1,2+3'"
)
_INDEX = re.compile(r"[0-9]+", re.ASCII)


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str | None
    name: str
    memory_total: int | None
    simulated: bool

    @property
    def label(self) -> str:
        return f"gpu{self.index}"

    @property
    def cuda_visible_devices(self) -> str:
        # CUDA numbers cards fastest-first unless CUDA_DEVICE_ORDER says otherwise, while
        # NVML numbers them by PCI bus; the UUID names the same card for both.
        return self.uuid if self.uuid else str(self.index)


@dataclass(frozen=True)
class CardGroup:
    """Several cards owned by one worker and its Ollama, for a model bigger than one card.

    It stands wherever a single Gpu does: `index` (its first card) picks its Ollama URL,
    `label` names all its cards ("gpu2+3"), and CUDA_VISIBLE_DEVICES lists them all, so
    the worker's Ollama sees every card of the group and spreads the model over them.
    """

    cards: tuple[Gpu, ...]

    @property
    def index(self) -> int:
        return self.cards[0].index

    @property
    def indexes(self) -> tuple[int, ...]:
        return tuple(card.index for card in self.cards)

    @property
    def label(self) -> str:
        return "gpu" + "+".join(str(index) for index in self.indexes)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(card.cuda_visible_devices for card in self.cards)

    @property
    def simulated(self) -> bool:
        return all(card.simulated for card in self.cards)

    @property
    def uuid(self) -> str | None:
        return self.cuda_visible_devices if not self.simulated else None

    @property
    def name(self) -> str:
        names = sorted({card.name for card in self.cards})
        return " + ".join(names) if len(names) > 1 else f"{len(self.cards)} × {names[0]}"

    @property
    def memory_total(self) -> int | None:
        sizes = [card.memory_total for card in self.cards]
        return None if None in sizes else sum(sizes)


# What one worker owns: a card, or a group of cards.
Unit = Gpu | CardGroup


def simulated_gpu(index: int) -> Gpu:
    return Gpu(index=index, uuid=None, name="simulated", memory_total=None, simulated=True)


def _text(value: str | bytes) -> str:
    # Older pynvml bindings return bytes, newer ones str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def nvml_gpus() -> list[Gpu]:
    """The cards the NVIDIA driver reports, by NVML index; [] without a driver or NVML."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError):
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        count = 0
    try:
        gpus = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except pynvml.NVMLError:
                # A card fallen off the bus must not take the healthy ones with it; the
                # others keep their indexes, so names and queues stay stable.
                continue
            uuid = _optional(pynvml, pynvml.nvmlDeviceGetUUID, handle)
            name = _optional(pynvml, pynvml.nvmlDeviceGetName, handle)
            memory = _optional(pynvml, pynvml.nvmlDeviceGetMemoryInfo, handle)
            gpus.append(
                Gpu(
                    index=index,
                    uuid=_text(uuid) if uuid else None,
                    name=_text(name) if name else f"GPU {index}",
                    memory_total=int(memory.total) if memory is not None else None,
                    simulated=False,
                )
            )
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _optional(pynvml, read, handle):
    # One detail that a card does not report (some vGPU and MIG setups refuse memory
    # queries) should not hide the card itself.
    try:
        return read(handle)
    except pynvml.NVMLError:
        return None


def parse_spec(spec: str | None) -> int | list[int | tuple[int, ...]] | None:
    """None: discover; int: that many simulated cards; list: these cards, sorted, where a
    tuple is a group of cards for one worker ("0,1,2+3" -> [0, 1, (2, 3)])."""
    text = (spec or "").strip()
    if not text:
        return None
    if text.lower() == "none":
        return 0
    if "," not in text and "+" not in text:
        if not _INDEX.fullmatch(text):
            raise ValueError(f"{SPEC_VARIABLE}={spec!r} is not valid: {_SPEC_FORMS}.")
        return int(text)
    items = [item.strip() for item in text.split(",")]
    if items[-1] == "":
        items.pop()
    units: list[int | tuple[int, ...]] = []
    for item in items:
        parts = [part.strip() for part in item.split("+")]
        if not parts or not all(_INDEX.fullmatch(part) for part in parts):
            raise ValueError(f"{SPEC_VARIABLE}={spec!r} is not valid: {_SPEC_FORMS}.")
        indexes = tuple(sorted(int(part) for part in parts))
        units.append(indexes if len(indexes) > 1 else indexes[0])
    if not units:
        raise ValueError(f"{SPEC_VARIABLE}={spec!r} is not valid: {_SPEC_FORMS}.")
    flat = [index for unit in units for index in _indexes(unit)]
    if len(set(flat)) != len(flat):
        raise ValueError(f"{SPEC_VARIABLE}={spec!r} names a card twice: {_SPEC_FORMS}.")
    return sorted(units, key=lambda unit: _indexes(unit)[0])


def _indexes(unit: int | tuple[int, ...]) -> tuple[int, ...]:
    return unit if isinstance(unit, tuple) else (unit,)


def _unit(cards: list[Gpu]) -> Unit:
    return cards[0] if len(cards) == 1 else CardGroup(tuple(cards))


def discover_gpus(spec: str | None = None) -> list[Unit]:
    """The cards to run workers on, as RMASSIMO_GPUS (or `spec`) asks, one entry per worker.

    - empty: every card NVML finds ([] without a driver);
    - "N": N simulated cards 0..N-1, whatever the hardware ("0" or "none": CPU only);
    - "i,j": cards i and j from NVML, or simulated cards i and j when NVML finds none;
    - "i,j+k": card i, and cards j and k as one group (one worker, one Ollama).
    """
    if spec is None:
        spec = os.environ.get(SPEC_VARIABLE)
    wanted = parse_spec(spec)
    if wanted is None:
        return nvml_gpus()
    if isinstance(wanted, int):
        return [simulated_gpu(index) for index in range(wanted)]
    found = nvml_gpus()
    if not found:
        return [_unit([simulated_gpu(i) for i in _indexes(unit)]) for unit in wanted]
    by_index = {gpu.index: gpu for gpu in found}
    missing = [i for unit in wanted for i in _indexes(unit) if i not in by_index]
    if missing:
        raise ValueError(
            f"{SPEC_VARIABLE}={spec!r} asks for card(s) {', '.join(map(str, missing))}, "
            f"but NVML finds only {', '.join(str(gpu.index) for gpu in found)} on this host."
        )
    return [_unit([by_index[i] for i in _indexes(unit)]) for unit in wanted]


def pinned_group(indexes: tuple[int, ...], found: list[Gpu] | None = None) -> Unit:
    """The card or card group a worker started for host cards `indexes` runs on.

    As with `pinned_gpu`, a container that reserved exactly these cards sees them through
    NVML numbered from 0: they are taken in order as the host's cards.
    """
    if len(indexes) == 1:
        return pinned_gpu(indexes[0], found)
    if found is None:
        found = nvml_gpus()
    if not found:
        return _unit([simulated_gpu(index) for index in indexes])
    by_index = {gpu.index: gpu for gpu in found}
    if all(index in by_index for index in indexes):
        return _unit([by_index[index] for index in indexes])
    if len(found) == len(indexes):
        return _unit(
            [
                Gpu(index, gpu.uuid, gpu.name, gpu.memory_total, gpu.simulated)
                for index, gpu in zip(indexes, found, strict=True)
            ]
        )
    raise ValueError(
        f"Cards {'+'.join(map(str, indexes))} are not among the cards NVML finds on this "
        f"host ({', '.join(str(gpu.index) for gpu in found)})."
    )


def pinned_gpu(index: int, found: list[Gpu] | None = None) -> Gpu:
    """The card a worker started for host card `index` runs on, named gpu<index>.

    A container that reserved one card sees it through NVML as card 0 whatever its host
    index, so when NVML shows exactly one card that card is taken as `index`; its UUID
    still names it correctly for CUDA_VISIBLE_DEVICES. Without NVML the card is simulated.
    """
    if index < 0:
        raise ValueError(f"A card index is 0 or more, not {index}.")
    if found is None:
        found = nvml_gpus()
    if not found:
        return simulated_gpu(index)
    for gpu in found:
        if gpu.index == index:
            return gpu
    if len(found) == 1:
        only = found[0]
        return Gpu(
            index=index,
            uuid=only.uuid,
            name=only.name,
            memory_total=only.memory_total,
            simulated=only.simulated,
        )
    raise ValueError(
        f"Card {index} is not among the cards NVML finds on this host "
        f"({', '.join(str(gpu.index) for gpu in found)})."
    )


def _clean_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if url and not re.match(r"https?://", url, re.IGNORECASE):
        raise ValueError(f"{URLS_VARIABLE} holds {url!r}, which is not an http:// or https:// URL.")
    return url


def ollama_urls_for(
    gpus: list[Unit], urls: list[str] | str, template: str | None = None
) -> dict[int, str]:
    """GPU index -> base URL of the Ollama server that owns that card (for a card group,
    its first card's index).

    One URL per GPU maps by position; otherwise `template` (with {port} = 11434 + index
    and {index}) is formatted per card; otherwise a single URL is shared by every card,
    which works but lets the cards queue behind one server (the caller should warn).
    """
    if isinstance(urls, str):
        urls = urls.split(",")
    cleaned = [url for url in (_clean_url(url) for url in urls) if url]
    if not gpus:
        return {}
    if len(cleaned) == len(gpus):
        return {gpu.index: url for gpu, url in zip(gpus, cleaned, strict=True)}
    if template and template.strip():
        mapping = {}
        for gpu in gpus:
            try:
                url = template.strip().format(port=OLLAMA_BASE_PORT + gpu.index, index=gpu.index)
            except (KeyError, IndexError, ValueError) as error:
                raise ValueError(
                    f"The Ollama URL template {template!r} may only use {{port}} and "
                    f"{{index}}: {error}."
                ) from error
            mapping[gpu.index] = _clean_url(url)
        return mapping
    if len(cleaned) == 1:
        return {gpu.index: cleaned[0] for gpu in gpus}
    raise ValueError(
        f"{URLS_VARIABLE} needs one URL per GPU, in card order, or a single URL shared by "
        f"all of them: there are {len(gpus)} GPUs "
        f"({', '.join(gpu.label for gpu in gpus)}) and {len(cleaned)} URLs."
    )


def describe(gpus: list[Unit]) -> str:
    """One line per card, for startup logs."""
    if not gpus:
        return "no GPUs (CPU only)"
    lines = []
    for gpu in gpus:
        if gpu.simulated:
            lines.append(f"{gpu.label}: simulated")
            continue
        memory = f"{gpu.memory_total / 2**30:.1f} GiB" if gpu.memory_total else "memory unknown"
        lines.append(f"{gpu.label}: {gpu.name}, {memory}, {gpu.uuid or 'no UUID'}")
    return "\n".join(lines)
