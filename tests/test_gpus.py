import sys
import types
from pathlib import Path

import pytest

from workers import gpus as gpus_module
from workers import launcher
from workers.gpus import (
    CardGroup,
    Gpu,
    describe,
    discover_gpus,
    nvml_gpus,
    ollama_urls_for,
    parse_spec,
    pinned_gpu,
    pinned_group,
    simulated_gpu,
)


class FakeNVMLError(Exception):
    pass


class FakeMemory:
    def __init__(self, total):
        self.total = total
        self.free = total
        self.used = 0


def fake_pynvml(cards, *, init_error=False, count_error=False, lost=(), no_memory=()):
    """A stand-in for the pynvml module; `cards` is a list of (uuid, name, bytes_total)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError
    module.calls = []

    def nvmlInit():
        module.calls.append("init")
        if init_error:
            raise FakeNVMLError("NVML Shared Library Not Found")

    def nvmlShutdown():
        module.calls.append("shutdown")

    def nvmlDeviceGetCount():
        if count_error:
            raise FakeNVMLError("Unknown Error")
        return len(cards)

    def nvmlDeviceGetHandleByIndex(index):
        if index in lost:
            raise FakeNVMLError("GPU is lost")
        return ("handle", index)

    def nvmlDeviceGetUUID(handle):
        return cards[handle[1]][0]

    def nvmlDeviceGetName(handle):
        return cards[handle[1]][1]

    def nvmlDeviceGetMemoryInfo(handle):
        if handle[1] in no_memory:
            raise FakeNVMLError("Not Supported")
        return FakeMemory(cards[handle[1]][2])

    for function in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetCount,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetUUID,
        nvmlDeviceGetName,
        nvmlDeviceGetMemoryInfo,
    ):
        setattr(module, function.__name__, function)
    return module


H100 = 85899345920
TWO_CARDS = [
    (b"GPU-11111111-aaaa-bbbb-cccc-000000000000", b"NVIDIA H100 80GB HBM3", H100),
    ("GPU-22222222-aaaa-bbbb-cccc-000000000000", "NVIDIA H100 80GB HBM3", H100),
]
FOUR_CARDS = [(f"GPU-{i}", "NVIDIA L40S", 48 * 2**30) for i in range(4)]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("RMASSIMO_GPUS", raising=False)


@pytest.fixture
def nvml(monkeypatch):
    def install(cards, **options):
        module = fake_pynvml(cards, **options)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return install


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setattr(gpus_module, "nvml_gpus", lambda: [])


# --- Gpu -------------------------------------------------------------------------------


def test_label_and_cuda_visible_devices_prefer_the_uuid():
    real = Gpu(index=3, uuid="GPU-abc", name="NVIDIA A100", memory_total=1, simulated=False)
    assert real.label == "gpu3"
    assert real.cuda_visible_devices == "GPU-abc"
    fake = simulated_gpu(2)
    assert fake.label == "gpu2"
    assert fake.cuda_visible_devices == "2"
    assert (fake.uuid, fake.name, fake.memory_total, fake.simulated) == (
        None,
        "simulated",
        None,
        True,
    )


def test_gpu_is_frozen():
    with pytest.raises(AttributeError):
        simulated_gpu(0).index = 1


# --- NVML ------------------------------------------------------------------------------


def test_the_real_binding_never_raises():
    # nvidia-ml-py is installed everywhere, a driver only where there is a card.
    found = nvml_gpus()
    assert isinstance(found, list)
    if not Path("/proc/driver/nvidia").exists():
        assert found == []


def test_nvml_missing_module_finds_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvml_gpus() == []


def test_nvml_init_failure_finds_nothing(nvml):
    module = nvml(TWO_CARDS, init_error=True)
    assert nvml_gpus() == []
    assert "shutdown" not in module.calls


def test_nvml_reads_cards_from_bytes_and_str_bindings(nvml):
    module = nvml(TWO_CARDS)
    found = nvml_gpus()
    assert found == [
        Gpu(0, "GPU-11111111-aaaa-bbbb-cccc-000000000000", "NVIDIA H100 80GB HBM3", H100, False),
        Gpu(1, "GPU-22222222-aaaa-bbbb-cccc-000000000000", "NVIDIA H100 80GB HBM3", H100, False),
    ]
    assert all(isinstance(gpu.uuid, str) and isinstance(gpu.name, str) for gpu in found)
    assert found[0].cuda_visible_devices == "GPU-11111111-aaaa-bbbb-cccc-000000000000"
    assert module.calls == ["init", "shutdown"]


def test_nvml_shuts_down_even_when_enumeration_fails(nvml):
    module = nvml(TWO_CARDS, count_error=True)
    assert nvml_gpus() == []
    assert module.calls == ["init", "shutdown"]


def test_nvml_skips_a_lost_card_and_keeps_the_other_indexes(nvml):
    nvml(FOUR_CARDS, lost={1})
    assert [gpu.index for gpu in nvml_gpus()] == [0, 2, 3]


def test_nvml_keeps_a_card_whose_memory_is_unreported(nvml):
    nvml(TWO_CARDS, no_memory={1})
    found = nvml_gpus()
    assert [gpu.memory_total for gpu in found] == [H100, None]


# --- RMASSIMO_GPUS ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("4", 4),
        (" 4 ", 4),
        ("0", 0),
        ("none", 0),
        ("None", 0),
        ("0,2", [0, 2]),
        (" 2 , 0 ", [0, 2]),
        ("3,", [3]),
        ("0,1,2+3", [0, 1, (2, 3)]),
        ("3+2, 0", [0, (2, 3)]),
        ("2+3", [(2, 3)]),
        ("0+1+2+3,", [(0, 1, 2, 3)]),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["abc", "-1", "1,,x", "1,,2", ",", ",1", "1.5", "2 3", "0,0", "٣", "1+", "+1", "2+2", "0,1+0"],
)
def test_invalid_spec_is_explained(spec):
    with pytest.raises(ValueError) as raised:
        parse_spec(spec)
    message = str(raised.value)
    assert "RMASSIMO_GPUS" in message
    assert "'0,2'" in message and "'4'" in message


def test_empty_spec_discovers_through_nvml(nvml, no_env):
    nvml(TWO_CARDS)
    assert [gpu.label for gpu in discover_gpus()] == ["gpu0", "gpu1"]
    assert not any(gpu.simulated for gpu in discover_gpus(""))


def test_empty_spec_without_cards_is_cpu_only(nvml, no_env):
    nvml([])
    assert discover_gpus() == []


def test_a_number_simulates_that_many_cards_even_with_real_ones(nvml):
    nvml(TWO_CARDS)
    found = discover_gpus("4")
    assert found == [simulated_gpu(i) for i in range(4)]
    assert [gpu.label for gpu in found] == ["gpu0", "gpu1", "gpu2", "gpu3"]


@pytest.mark.parametrize("spec", ["0", "none", " NONE "])
def test_zero_or_none_means_cpu_only(nvml, spec):
    nvml(TWO_CARDS)
    assert discover_gpus(spec) == []


def test_spec_is_read_from_the_environment(monkeypatch, no_nvml):
    monkeypatch.setenv("RMASSIMO_GPUS", "3")
    assert [gpu.index for gpu in discover_gpus()] == [0, 1, 2]
    monkeypatch.setenv("RMASSIMO_GPUS", "bogus")
    with pytest.raises(ValueError, match="RMASSIMO_GPUS"):
        discover_gpus()


def test_an_explicit_spec_wins_over_the_environment(monkeypatch, no_nvml):
    monkeypatch.setenv("RMASSIMO_GPUS", "3")
    assert discover_gpus("1") == [simulated_gpu(0)]


def test_a_list_selects_real_cards(nvml):
    nvml(FOUR_CARDS)
    found = discover_gpus("2,0")
    assert [(gpu.index, gpu.uuid, gpu.simulated) for gpu in found] == [
        (0, "GPU-0", False),
        (2, "GPU-2", False),
    ]


def test_a_list_simulates_those_cards_without_nvml(no_nvml):
    assert discover_gpus("1,3") == [simulated_gpu(1), simulated_gpu(3)]
    assert discover_gpus("5,") == [simulated_gpu(5)]


def test_a_list_naming_an_absent_card_is_an_error(nvml):
    nvml(TWO_CARDS)
    with pytest.raises(ValueError, match=r"card\(s\) 5.*finds only 0, 1"):
        discover_gpus("0,5")


def test_a_plus_groups_real_cards_under_one_worker(nvml):
    nvml(FOUR_CARDS)
    found = discover_gpus("0,1,2+3")
    assert [unit.label for unit in found] == ["gpu0", "gpu1", "gpu2+3"]
    group = found[2]
    assert isinstance(group, CardGroup) and group.indexes == (2, 3)
    # its Ollama must see both cards: CUDA_VISIBLE_DEVICES lists both UUIDs
    assert group.cuda_visible_devices == "GPU-2,GPU-3"
    assert group.memory_total == 2 * 48 * 2**30 and not group.simulated
    spec = launcher.gpu_worker(group, "http://ollama-gpu2-3:11434", slots=1)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-2,GPU-3"
    assert spec.env["RMASSIMO_WORKER_GPU"] == "gpu2+3"
    assert spec.name.startswith("gpu2+3@")
    assert describe(found).splitlines()[2] == "gpu2+3: 2 × NVIDIA L40S, 96.0 GiB, GPU-2,GPU-3"
    # the group's Ollama URL is its first card's
    assert ollama_urls_for(found, [], "http://127.0.0.1:{port}")[2] == "http://127.0.0.1:11436"


def test_a_group_of_simulated_cards_without_nvml(no_nvml):
    (group,) = discover_gpus("1+3")
    assert group.label == "gpu1+3" and group.cuda_visible_devices == "1,3"


def test_a_group_naming_an_absent_card_is_an_error(nvml):
    nvml(TWO_CARDS)
    with pytest.raises(ValueError, match=r"card\(s\) 2"):
        discover_gpus("0,1+2")


def test_pinned_queues_name_the_host_and_the_cards():
    group = CardGroup((simulated_gpu(2), simulated_gpu(3)))
    assert launcher.pinned_queue(group, "host-a") == "gpu.2+3@host-a"
    assert launcher.pinned_queue(simulated_gpu(1), "host-b") == "gpu.1@host-b"
    assert launcher.pinned_queue(simulated_gpu(1), "host-a") != "gpu.1@host-b"


# --- pinned_gpu ------------------------------------------------------------------------


def test_pinned_gpu_on_the_host_takes_the_card_with_that_index():
    cards = [
        Gpu(0, "GPU-a", "A", 1, False),
        Gpu(1, "GPU-b", "B", 2, False),
    ]
    assert pinned_gpu(1, cards) == cards[1]


def test_pinned_gpu_in_a_container_relabels_its_only_card():
    # The container reserved host card 1; NVML inside it numbers that card 0.
    inside = [Gpu(0, "GPU-b", "B", 2, False)]
    gpu = pinned_gpu(1, inside)
    assert gpu == Gpu(1, "GPU-b", "B", 2, False)
    assert gpu.label == "gpu1"
    assert gpu.cuda_visible_devices == "GPU-b"


def test_pinned_group_in_a_container_takes_its_cards_in_order():
    inside = [Gpu(0, "GPU-c", "C", 2, False), Gpu(1, "GPU-d", "D", 2, False)]
    group = pinned_group((2, 3), inside)
    assert group.label == "gpu2+3" and group.cuda_visible_devices == "GPU-c,GPU-d"
    on_host = [Gpu(i, f"GPU-{i}", "X", 1, False) for i in range(4)]
    assert pinned_group((2, 3), on_host).cuda_visible_devices == "GPU-2,GPU-3"
    assert pinned_group((1,), on_host) == on_host[1]
    with pytest.raises(ValueError, match="Cards 2\\+3"):
        pinned_group((2, 3), on_host[:3])


def test_pinned_gpu_without_nvml_is_simulated(no_nvml):
    assert pinned_gpu(2) == simulated_gpu(2)


def test_pinned_gpu_absent_among_several_is_an_error():
    cards = [Gpu(0, "GPU-a", "A", 1, False), Gpu(1, "GPU-b", "B", 2, False)]
    with pytest.raises(ValueError, match="Card 4"):
        pinned_gpu(4, cards)
    with pytest.raises(ValueError):
        pinned_gpu(-1, cards)


# --- OLLAMA_URLS -----------------------------------------------------------------------


def cards(*indexes):
    return [simulated_gpu(i) for i in indexes]


def test_one_url_per_gpu_maps_by_position():
    assert ollama_urls_for(
        cards(0, 2), [" http://ollama-gpu0:11434/ ", "http://ollama-gpu2:11434//"]
    ) == {0: "http://ollama-gpu0:11434", 2: "http://ollama-gpu2:11434"}


def test_a_comma_separated_string_is_accepted():
    assert ollama_urls_for(cards(0, 1), "http://a:1, http://b:2/") == {
        0: "http://a:1",
        1: "http://b:2",
    }


def test_template_gives_each_card_its_port_and_index():
    assert ollama_urls_for(cards(0, 1, 3), [], "http://127.0.0.1:{port}/") == {
        0: "http://127.0.0.1:11434",
        1: "http://127.0.0.1:11435",
        3: "http://127.0.0.1:11437",
    }
    assert ollama_urls_for(cards(0, 1), ["http://x:1"], "http://ollama-gpu{index}:11434") == {
        0: "http://ollama-gpu0:11434",
        1: "http://ollama-gpu1:11434",
    }


def test_exact_urls_win_over_the_template():
    assert ollama_urls_for(cards(0, 1), ["http://a", "http://b"], "http://t:{port}") == {
        0: "http://a",
        1: "http://b",
    }


def test_template_with_an_unknown_field_is_an_error():
    with pytest.raises(ValueError, match=r"\{port\}"):
        ollama_urls_for(cards(0), [], "http://host:{gpu}")


def test_a_single_url_is_shared_by_every_card():
    assert ollama_urls_for(cards(0, 1, 2), ["http://127.0.0.1:11434/"]) == {
        0: "http://127.0.0.1:11434",
        1: "http://127.0.0.1:11434",
        2: "http://127.0.0.1:11434",
    }


@pytest.mark.parametrize(
    "urls",
    [
        ["http://a", "http://b"],
        ["http://a", "http://b", "http://c", "http://d"],
        [],
        ["", " "],
    ],
)
def test_mismatched_urls_are_explained(urls):
    with pytest.raises(ValueError) as raised:
        ollama_urls_for(cards(0, 1, 2), urls)
    message = str(raised.value)
    assert "OLLAMA_URLS" in message and "one URL per GPU" in message
    assert "3 GPUs" in message and f"{len([u for u in urls if u.strip()])} URLs" in message


def test_no_gpus_need_no_urls():
    assert ollama_urls_for([], []) == {}
    assert ollama_urls_for([], ["http://a", "http://b"]) == {}


def test_a_url_without_scheme_is_an_error():
    with pytest.raises(ValueError, match="ollama-gpu0:11434"):
        ollama_urls_for(cards(0), ["ollama-gpu0:11434"])


# --- describe --------------------------------------------------------------------------


def test_describe_has_one_line_per_card():
    text = describe(
        [
            Gpu(0, "GPU-abc", "NVIDIA H100 80GB HBM3", H100, False),
            Gpu(1, None, "NVIDIA T4", None, False),
            simulated_gpu(2),
        ]
    )
    assert text.splitlines() == [
        "gpu0: NVIDIA H100 80GB HBM3, 80.0 GiB, GPU-abc",
        "gpu1: NVIDIA T4, memory unknown, no UUID",
        "gpu2: simulated",
    ]


def test_describe_without_cards():
    assert describe([]) == "no GPUs (CPU only)"


def _workers_started(monkeypatch, spec: str) -> list[str]:
    """The workers `manage.py run_workers` starts with RMASSIMO_GPUS=spec (no process runs)."""
    import io

    from django.conf import settings
    from django.core.management import call_command

    from workers import launcher

    started: list[str] = []
    monkeypatch.setattr(settings, "RMASSIMO_GPUS", spec)
    monkeypatch.setattr(
        launcher.Supervisor, "run", lambda self: started.extend(s.name for s in self.specs) or 0
    )
    call_command("run_workers", stdout=io.StringIO())
    return [name.split("@")[0] for name in started]


def _gpu_workers(names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("gpu")]


def test_rmassimo_gpus_0_runs_no_gpu_worker_only_the_cpu_worker(nvml, monkeypatch):
    nvml(TWO_CARDS)
    for spec in ("0", "none"):
        started = _workers_started(monkeypatch, spec)
        assert _gpu_workers(started) == [] and "cpu" in started


def test_without_any_card_one_simulated_gpu_worker_still_answers(nvml, monkeypatch):
    nvml([])
    started = _workers_started(monkeypatch, "")
    assert _gpu_workers(started) == ["gpu0"] and "cpu" in started
