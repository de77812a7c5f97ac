"""The planner's exact parameter counts and its model-state memory against DeepSpeed's own
estimator (work in progress, issue 6)."""

from __future__ import annotations

import pytest

from distft.plan import model_state_bytes, plan
from distft.preflight import preflight


def planned(*overrides: str) -> dict:
    cfg, errors = preflight(list(overrides))
    assert errors == [], errors
    return plan(cfg)


@pytest.mark.parametrize("model, total", [
    ("llama_7b", 6_738_415_616), ("llama_13b", 13_015_864_320), ("llama_33b", 32_528_943_616),
    ("llama_65b", 65_285_660_672), ("llama2_7b", 6_738_415_616), ("llama2_13b", 13_015_864_320),
    ("llama2_70b", 68_976_648_192), ("tiny", 885_888),
])
def test_every_preset_has_its_exact_parameter_count(model, total):
    result = planned(f"model={model}", "cluster=a100_80g_8x")
    assert result["params_total"] == result["params_trainable"] == total
    assert result["params_frozen"] == result["params_quantized"] == 0


def test_lora_and_qlora_counts_on_llama2_7b():
    # LoRA r=16 on the 7 linear layers of 32 decoder layers: r x (in + out) each.
    h, i, kv, layers, r = 4096, 11008, 4096, 32, 16
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 2 + (i + h))
    lora = planned("model=llama2_7b", "technique=lora", "technique.r=16", "cluster=a100_80g_8x")
    assert lora["params_trainable"] == layers * per_layer == 39_976_960
    assert lora["params_total"] == 6_738_415_616 + 39_976_960
    qlora = planned("model=llama2_7b", "technique=qlora", "technique.r=16", "cluster=a100_80g_8x")
    assert qlora["params_trainable"] == 39_976_960
    # Every decoder Linear is quantised; embeddings, norms and the output head are not.
    assert qlora["params_quantized"] == layers * (4 * h * h + 3 * h * i) == 6_476_005_376


@pytest.mark.parametrize("model, nodes, gpus", [("llama_7b", 1, 8), ("llama_65b", 2, 8), ("llama2_70b", 4, 8)])
def test_full_finetuning_model_states_agree_with_deepspeeds_estimator(model, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    common = [f"model={model}", "cluster=a100_80g_8x", f"launcher.nnodes={nodes}", f"launcher.nproc_per_node={gpus}",
              "launcher.rdzv_endpoint=n1:29500", f"train.global_batch_size={4 * nodes * gpus}"]
    for offload in (False, True):
        cfg, errors = preflight([*common, "parallel=zero2", f"parallel.deepspeed.offload_optimizer={offload}"])
        assert errors == []
        from deepspeed.runtime.zero.stage3 import model_to_params

        from distft.plan import build_meta_model, count_parameters

        counts = count_parameters(cfg)
        # DeepSpeed's own largest layer of the same model (its total dedups by data_ptr, all 0 on meta).
        assert model_to_params(build_meta_model(cfg))[1] == counts.largest_module
        ours = sum(model_state_bytes(cfg, counts).values())
        _, theirs = estimate_zero2_model_states_mem_needs(counts.total, gpus, nodes, cpu_offload=offload)
        assert abs(ours - theirs) <= 2, (offload, ours, theirs)
        cfg, errors = preflight([*common, "parallel=zero3", f"parallel.deepspeed.offload_optimizer={offload}",
                                 f"parallel.deepspeed.offload_param={offload}"])
        assert errors == []
        ours = sum(model_state_bytes(cfg, counts).values())
        theirs = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_module, gpus, nodes,
                                                        cpu_offload=offload, cpu_offload_params=offload)[1]
        assert abs(ours - theirs) <= 2, (offload, ours, theirs)


def test_plan_json_has_the_documented_keys():
    result = planned("+experiment=qlora_13b", "cluster=a100_40g_8x")
    assert {"params_total", "params_trainable", "per_gpu_bytes", "fits"} <= result.keys()
    assert set(result["per_gpu_bytes"]) == {"weights", "grads", "optimizer", "activations", "overhead", "total"}
    assert result["per_gpu_bytes"]["total"] == sum(v for k, v in result["per_gpu_bytes"].items() if k != "total")
    assert result["fits"] is True and result["advice"] == []


def test_a_plan_that_does_not_fit_lists_changes_that_do():
    result = planned("model=llama_65b", "parallel=zero2", "launcher.nproc_per_node=8", "cluster=a100_80g_8x",
                     "train.global_batch_size=32")
    assert result["fits"] is False
    assert result["per_gpu_bytes"]["total"] > 0.9 * 80 * 1024**3
    changes = {item["change"]: item["per_gpu_total_bytes"] for item in result["advice"]}
    assert "parallel=zero3 parallel.deepspeed.offload_optimizer=true" in changes
    assert all(total <= 0.9 * 80 * 1024**3 for total in changes.values())  # each advised change fits


def test_the_slurm_launcher_refuses_a_job_that_cannot_fit_before_asking_the_cluster(capsys):
    """No SLURM command runs: the plan alone refuses (this machine may have no SLURM at all)."""
    from launchers.slurm import submit

    cfg, errors = preflight(["model=llama_65b", "launcher=slurm", "launcher.nodes=1", "launcher.gpus_per_node=8",
                             "launcher.time_min=60", "parallel=zero2", "cluster=a100_80g_8x",
                             "train.global_batch_size=32"])
    assert errors == []
    assert submit(cfg, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("distft: not submitted, nothing queued: the plan does not fit cluster=a100_80g_8x")
    assert "does NOT fit in 80 GiB with 10% headroom" in err and "would fit: parallel=zero3" in err
