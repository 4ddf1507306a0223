"""Device figures for health reports: CPU over the window, memory, disk, RAPL energy where readable."""

from __future__ import annotations

from pathlib import Path

from edgefleet_agent.system import EnergyMeter, SystemSampler


def _zone(root: Path, name: str, energy: int, max_range: int = 1000) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_energy_sums_package_zones_and_survives_a_counter_wrap(tmp_path: Path) -> None:
    package0 = _zone(tmp_path, "intel-rapl:0", 900_000, max_range=999_999)
    package1 = _zone(tmp_path, "intel-rapl:1", 100)
    _zone(tmp_path, "intel-rapl:0:0", 5)  # a part of package 0: not counted twice
    meter = EnergyMeter(tmp_path)
    assert meter.available
    (package0 / "energy_uj").write_text("100000\n")  # wrapped: 99,999 + 1 + 100,000 µJ
    (package1 / "energy_uj").write_text("1100\n")
    assert meter.joules_since_last() == (99_999 + 1 + 100_000 + 1000) / 1e6
    assert meter.joules_since_last() == 0.0


def test_no_readable_rapl_means_no_energy_figure(tmp_path: Path) -> None:
    assert EnergyMeter(tmp_path / "missing").joules_since_last() is None
    zone = _zone(tmp_path, "intel-rapl:0", 5)
    (zone / "energy_uj").write_text("not a number")
    assert not EnergyMeter(tmp_path).available


def test_a_sample_is_within_bounds(tmp_path: Path) -> None:
    sampler = SystemSampler(tmp_path, powercap=tmp_path / "none")
    sum(i * i for i in range(200_000))  # some CPU work inside the window
    stats = sampler.sample()
    assert 0.0 <= stats.cpu_percent <= 100.0
    assert 0 < stats.memory_used_bytes <= stats.memory_total_bytes
    assert 0 < stats.disk_used_bytes <= stats.disk_total_bytes
    assert stats.energy_joules is None
