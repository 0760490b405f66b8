"""The machine block: /proc/cpuinfo parsing on sample texts, this machine's fields, and the
graceful answer where there is no /proc/cpuinfo."""

from __future__ import annotations

import json

import pytest
import torch

from leantorch.errors import LeanError
from leantorch.measure import hardware, machine_info, machine_summary
from leantorch.measure.hardware import X86_FEATURES, parse_cpuinfo

ZEN4_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr "
    "sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl "
    "nonstop_tsc cpuid extd_apicid aperfmperf rapl pni pclmulqdq monitor ssse3 fma cx16 pcid "
    "sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm cmp_legacy svm "
    "extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext "
    "perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 hw_pstate ssbd mba "
    "perfmon_v2 ibrs ibpb stibp ibrs_enhanced vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid "
    "cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd sha_ni "
    "avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc avx512_bf16 clzero "
    "irperf xsaveerptr rdpru wbnoinvd amd_ppin cppc arat npt lbrv svm_lock nrip_save "
    "tsc_scale vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic "
    "v_vmsave_vmload vgif x2avic v_spec_ctrl vnmi avx512vbmi umip pku ospke avx512_vbmi2 gfni "
    "vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid overflow_recov "
    "succor smca fsrm flush_l1d")
SPR_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi "
    "mmx fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon "
    "pebs bts rep_good nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni "
    "pclmulqdq dtes64 monitor ds_cpl vmx smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca "
    "sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm "
    "abm 3dnowprefetch cpuid_fault epb cat_l3 cat_l2 cdp_l3 invpcid_single intel_ppin cdp_l2 "
    "ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow flexpriority ept vpid ept_ad fsgsbase "
    "tsc_adjust bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap "
    "avx512ifma clflushopt clwb intel_pt avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec "
    "xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local split_lock_detect "
    "avx_vnni avx512_bf16 wbnoinvd dtherm ida arat pln pts hfi vnmi avx512vbmi umip pku ospke "
    "waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq "
    "la57 rdpid bus_lock_detect cldemote movdiri movdir64b enqcmd fsrm md_clear serialize "
    "tsxldtrk pconfig arch_lbr ibt amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d "
    "arch_capabilities")


def cpuinfo(vendor: str, model: str, flags: str, cores: list[tuple[int, int]]) -> str:
    """A /proc/cpuinfo text with one entry per (physical id, core id) pair."""
    entries = []
    for index, (socket, core) in enumerate(cores):
        entries.append(f"processor\t: {index}\nvendor_id\t: {vendor}\ncpu family\t: 25\n"
                       f"model name\t: {model}\nphysical id\t: {socket}\n"
                       f"core id\t\t: {core}\nflags\t\t: {flags}\n")
    return "\n".join(entries)


def test_zen4_has_vnni_and_bf16_but_no_amx() -> None:
    # 2 sockets x 2 cores x 2 SMT threads: 8 logical CPUs on 4 physical cores
    text = cpuinfo("AuthenticAMD", "AMD EPYC 9654 96-Core Processor", ZEN4_FLAGS,
                   [(s, c) for s in (0, 1) for c in (0, 1)] * 2)
    info = parse_cpuinfo(text)
    assert info["model"] == "AMD EPYC 9654 96-Core Processor"
    assert info["vendor"] == "AuthenticAMD"
    assert info["logical_cpus"] == 8 and info["physical_cores"] == 4
    assert info["features"] == {"avx2": True, "avx512f": True, "avx512_vnni": True,
                                "avx_vnni": False, "avx512_bf16": True, "amx_bf16": False,
                                "amx_int8": False, "amx_tile": False}


def test_sapphire_rapids_has_every_matrix_feature() -> None:
    text = cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+", SPR_FLAGS, [(0, 0), (0, 1)])
    info = parse_cpuinfo(text)
    assert info["vendor"] == "GenuineIntel" and info["logical_cpus"] == 2
    assert info["features"] == dict.fromkeys(X86_FEATURES, True)
    summary = machine_summary({"cpu": info, "torch_cpu_capability": "AVX512", "threads": 2})
    assert summary == ("Intel(R) Xeon(R) Platinum 8480+ (AVX-512 VNNI, AVX-VNNI, AVX512-BF16, "
                       "AMX), torch CPU capability AVX512, 2 threads")


def test_arm_and_featureless_texts() -> None:
    arm = ("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes pmull sha1 "
           "sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp i8mm bf16\n"
           "CPU implementer\t: 0x41\nCPU part\t: 0xd40\n\nprocessor\t: 1\nFeatures\t: fp\n")
    info = parse_cpuinfo(arm)
    assert info["vendor"] == "0x41" and info["logical_cpus"] == 2
    assert info["physical_cores"] is None and info["model"] is None
    assert info["features"] == {"asimd": True, "asimddp": True, "i8mm": True, "bf16": True,
                                "sve": False, "sve2": False, "sme": False}
    assert parse_cpuinfo("")["features"] is None  # unknown, not "absent"
    bare = {"cpu": {**parse_cpuinfo(""), "model": "x"}, "threads": 1}
    assert machine_summary(bare) == "x (features unknown), 1 thread"


def test_this_machine_block_is_complete_typed_and_json() -> None:
    info = machine_info()
    assert json.loads(json.dumps(info)) == info
    cpu = info["cpu"]
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert isinstance(cpu["logical_cpus"], int) and cpu["logical_cpus"] >= 1
    assert isinstance(cpu["available_cpus"], int) and cpu["available_cpus"] >= 1
    assert info["threads"] == torch.get_num_threads()
    assert info["torch"] == torch.__version__
    assert info["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if cpu["source"] == "/proc/cpuinfo" and cpu["features"] is not None:
        assert all(isinstance(v, bool) for v in cpu["features"].values())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert machine_info()["threads"] == 1  # read at the call, not cached
    finally:
        torch.set_num_threads(threads)


def test_without_proc_cpuinfo_the_block_degrades(monkeypatch) -> None:
    hardware.cpu_info.cache_clear()
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    try:
        cpu = hardware.cpu_info()
        assert cpu["source"] == "platform" and cpu["features"] is None
        assert isinstance(cpu["model"], str) and cpu["model"]
        assert cpu["logical_cpus"] is None or cpu["logical_cpus"] >= 1
    finally:
        hardware.cpu_info.cache_clear()


@pytest.mark.skipif(not hardware.sys.platform.startswith("linux"), reason="reads /proc")
def test_on_linux_the_block_is_read_from_proc() -> None:
    assert hardware.cpu_info()["source"] == "/proc/cpuinfo"


# --------------------------------------------------------------------------- kernel paths
# oneDNN 3.12's verbose lines as torch 2.13 prints them on a Sapphire Rapids-class CPU
SPR_VERBOSE = {
    "float32": "",  # MKL's sgemm: no oneDNN primitive
    "bfloat16": (
        "onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)\n"
        "onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:1\n"
        "onednn_verbose,v1,info,cpu,isa:Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit "
        "integer support\n"
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,"
        "src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,"
        "attr-scratchpad:user,,32x32:32x32,0.11\n"),
    "float16": ("onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512,undef,"
                "src:f16::blocked:ab::f0,,,32x32:32x32,0.04\n"),
    "int8": ("onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src_s8::blocked:ab:f0 "
             "wei_s8::blocked:ab:f0 dst_s32::blocked:ab:f0,,,32x32:32x32,46.2\n"),
}
# what an AVX512-BF16 CPU without AMX (Zen 4, Cooper Lake) reports
ZEN4_VERBOSE = {
    "float32": "",
    "bfloat16": (
        "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 "
        "support\n"
        "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,...\n"),
    "float16": "onednn_verbose,v1,primitive,exec,cpu,matmul,ref:any,undef,...\n",
    "int8": "onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,...\n",
}


def test_paths_on_a_cpu_with_amx() -> None:
    features = parse_cpuinfo(cpuinfo("GenuineIntel", "Xeon", SPR_FLAGS, [(0, 0)]))["features"]
    paths = hardware.describe_kernel_paths({**features, "avx512_fp16": True}, "AVX512", True,
                                           SPR_VERBOSE, "MKL")
    assert paths["onednn"] == {"available": True, "version": "3.12.0", "isa": (
        "Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support")}
    assert paths["float32"] == {"library": "MKL", "implementation": None, "unit": "AVX-512",
                                "source": "onednn verbose (no oneDNN primitive ran)"}
    assert paths["bfloat16"] == {"library": "oneDNN",
                                 "implementation": "matmul:brg_matmul:avx10_1_512_amx",
                                 "unit": "AMX", "source": "onednn verbose"}
    assert paths["float16"]["unit"] == "AVX512-FP16"
    assert paths["float16"]["source"] == "onednn verbose + cpu flags"
    # the int8 GEMM API names no ISA: VNNI from the flags, never AMX
    assert paths["int8"] == {"library": "oneDNN", "implementation": "gemm_api",
                             "unit": "AVX-512 VNNI", "source": "onednn verbose + cpu flags"}


def test_paths_on_a_cpu_without_amx() -> None:
    features = parse_cpuinfo(cpuinfo("AuthenticAMD", "EPYC", ZEN4_FLAGS, [(0, 0)]))["features"]
    paths = hardware.describe_kernel_paths(features, "AVX512", True, ZEN4_VERBOSE, "MKL")
    assert paths["onednn"]["isa"] == "Intel AVX-512 with Intel DL Boost and bfloat16 support"
    assert paths["onednn"]["version"] is None  # the header was not in the captured text
    assert paths["bfloat16"]["implementation"] == "matmul:brg_matmul:avx512_core_bf16"
    assert paths["bfloat16"]["unit"] == "AVX512-BF16"
    assert paths["float16"]["implementation"] == "matmul:ref:any"  # a reference kernel
    assert paths["int8"]["unit"] == "AVX-512 VNNI"
    assert all(paths[d]["unit"] != "AMX" for d in hardware.PROBED_DTYPES)


def test_paths_without_verbose_output_come_from_the_flags() -> None:
    avx2_vnni = {name: name in ("avx2", "avx_vnni") for name in X86_FEATURES}
    paths = hardware.describe_kernel_paths(avx2_vnni, "AVX2", True, None, "OpenBLAS")
    assert paths["onednn"] == {"available": True, "version": None, "isa": None}
    assert paths["float32"] == {"library": "OpenBLAS", "implementation": None, "unit": "AVX2",
                                "source": "cpu flags"}
    assert paths["int8"]["unit"] == "AVX-VNNI" and paths["bfloat16"]["unit"] == "AVX2"
    bare = hardware.describe_kernel_paths(None, None, False, None, None)
    assert {bare[d]["unit"] for d in hardware.PROBED_DTYPES} == {"none"}
    assert bare["bfloat16"]["library"] == "BLAS"


def test_this_machines_paths_agree_with_its_flags() -> None:
    paths = hardware.kernel_paths()
    features = hardware.cpu_info()["features"] or {}
    assert machine_info()["kernel_paths"] == paths  # every report carries them
    assert paths["onednn"]["available"] == torch.backends.mkldnn.is_available()
    for dtype in hardware.PROBED_DTYPES:
        entry = paths[dtype]
        assert set(entry) >= {"library", "implementation", "unit", "source"}
        if entry["unit"] == "AMX":  # read from oneDNN, and the CPU says it has the tiles
            assert "amx" in entry["implementation"] and features.get("amx_tile")
    isa = paths["onednn"]["isa"]
    if isa is not None:
        assert ("AMX" in isa) == bool(features.get("amx_tile"))
        if "AMX" in isa and "bfloat16" in isa:  # oneDNN picks AMX for a bf16 matmul
            assert paths["bfloat16"]["unit"] == "AMX"
    if features.get("avx512_vnni"):
        assert paths["int8"]["unit"] == "AVX-512 VNNI"


def test_stdout_capture_takes_c_level_writes_and_restores(capfd) -> None:
    import os

    with hardware._stdout_captured() as read:
        os.write(1, b"onednn_verbose,from C\n")
    assert read() == "onednn_verbose,from C\n"
    print("after")
    assert capfd.readouterr().out == "after\n"


# --------------------------------------------------------------------------- peaks
def test_matrix_peaks_is_data_about_what_ran() -> None:
    result = hardware.matrix_peaks(("float32", "bfloat16", "int8"), size=64, seconds=0.05)
    assert result["size"] == 64 and result["threads"] == torch.get_num_threads()
    assert result["rounds"] >= 3
    assert list(result["peaks"]) == ["float32", "bfloat16", "int8"]
    for dtype, peak in result["peaks"].items():
        assert peak["op"] == ("torch._int_mm" if dtype == "int8" else "torch.mm")
        assert peak["ops_per_second"] == pytest.approx(2 * 64 ** 3 / (peak["median_ms"] / 1e3))
    assert result["peaks"]["float32"]["speedup_vs_float32"] == 1.0
    assert result["kernel_paths"] == {d: hardware.kernel_paths()[d]
                                      for d in ("float32", "bfloat16", "int8")}
    json.dumps(result)
    alone = hardware.matrix_peaks(["int8"], size=32, seconds=0.01)
    assert alone["peaks"]["int8"]["speedup_vs_float32"] is None


@pytest.mark.parametrize("kwargs,fragment", [
    ({"dtypes": "float32"}, "dtypes='float32'; expected a non-empty list"),
    ({"dtypes": ()}, r"dtypes=\(\); expected a non-empty list"),
    ({"dtypes": ("float64",)}, "dtype 'float64' in dtypes"),
    ({"dtypes": ("int8", "int8")}, "names a dtype twice"),
    ({"size": 8}, "size=8; expected an int >= 16"),
    ({"seconds": 0}, r"seconds=0; expected a number in \(0, 600\]"),
])
def test_matrix_peaks_rejects_bad_arguments(kwargs, fragment) -> None:
    with pytest.raises(LeanError, match=fragment):
        hardware.matrix_peaks(**kwargs)


def test_cli_profile_hardware_prints_paths_and_peaks(capsys) -> None:
    from leantorch.cli import main

    assert main(["profile", "--hardware", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["machine"]["kernel_paths"] == hardware.kernel_paths()
    assert list(data["matrix_peaks"]["peaks"]) == ["float32", "bfloat16", "float16", "int8"]
    assert main(["profile", "--hardware", "minilm"]) == 2
    assert "--hardware describes this machine and takes no MODEL" in capsys.readouterr().err
    assert main(["profile"]) == 2
    assert "profile needs a MODEL" in capsys.readouterr().err
