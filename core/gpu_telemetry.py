"""Per-card telemetry through NVML, read when a worker's metrics are scraped.

Without an NVIDIA driver (or without the binding) the collector yields nothing: no error,
no metric, so a dashboard shows "no data" rather than zeros that look like idle cards.
"""

from __future__ import annotations

import logging
import os
import re

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

_NVML_TEMPERATURE_GPU = 0  # pynvml.NVML_TEMPERATURE_GPU


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlCollector(Collector):
    """The cards of one worker: those in its CUDA_VISIBLE_DEVICES (UUIDs or indexes), else
    the indexes in its label (`gpu2+3`)."""

    def __init__(self, *, gpu: str, visible: str | None = None) -> None:
        self.gpu = gpu
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
        self._nvml = None
        self._failed = False

    def _init(self):
        if self._nvml is None and not self._failed:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # noqa: BLE001 - no driver, no library: no telemetry
                self._failed = True
        return self._nvml

    def _cards(self, nvml) -> list[tuple[int, object]]:
        wanted = [v.strip() for v in self.visible.split(",") if v.strip()]
        if not wanted:
            wanted = re.findall(r"\d+", self.gpu)
        cards = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError:
                continue
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError:
                uuid = ""
            if str(index) in wanted or (uuid and uuid in wanted):
                cards.append((index, handle))
        return cards

    def collect(self):
        nvml = self._init()
        if nvml is None:
            return
        labels = ["gpu", "card"]
        families = {
            "util": GaugeMetricFamily(
                "rmassimo_gpu_utilization_ratio",
                "Share of the last sample period the card was computing (NVML), 0 to 1.",
                labels=labels,
            ),
            "used": GaugeMetricFamily(
                "rmassimo_gpu_memory_used_bytes", "Card memory in use (NVML).", labels=labels
            ),
            "total": GaugeMetricFamily(
                "rmassimo_gpu_memory_total_bytes", "Card memory in all (NVML).", labels=labels
            ),
            "temp": GaugeMetricFamily(
                "rmassimo_gpu_temperature_celsius", "Card temperature (NVML).", labels=labels
            ),
            "power": GaugeMetricFamily(
                "rmassimo_gpu_power_watts", "Card power draw (NVML).", labels=labels
            ),
        }
        try:
            cards = self._cards(nvml)
        except Exception:  # noqa: BLE001
            logger.debug("NVML enumeration failed", exc_info=True)
            return
        for index, handle in cards:
            values = [self.gpu, str(index)]
            # Each reading on its own: a card may refuse one (some vGPU setups refuse power).
            for key, read in (
                ("util", lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                ("used", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).used),
                ("total", lambda h: nvml.nvmlDeviceGetMemoryInfo(h).total),
                ("temp", lambda h: nvml.nvmlDeviceGetTemperature(h, _NVML_TEMPERATURE_GPU)),
                ("power", lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    families[key].add_metric(values, float(read(handle)))
                except Exception:  # noqa: BLE001, S112 - not reported by this card
                    continue
        for family in families.values():
            if family.samples:
                yield family
