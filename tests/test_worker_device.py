"""Device and precision plans, the one inner step, the host-side outer state and the memory estimate."""

from __future__ import annotations

import hashlib

import pytest
import torch

from model.checkpoints import tensors_digest
from model.presets import build_model, llama_config, parameter_count
from worker.device import DeviceError, plan_device
from worker.memory import (
    DoesNotFit, Workload, activation_bytes_per_token, check_fits, estimate, is_out_of_memory, largest_micro_batch,
    OutOfDeviceMemory, out_of_memory_refused,
)
from worker.outer_state import OuterState
from worker.step import inner_optimizer, inner_step

VOCAB = 300
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def batch(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 32), generator=torch.Generator().manual_seed(seed))


# -- the plan ---------------------------------------------------------------------------

def test_auto_on_a_machine_without_cuda_trains_on_the_cpu_in_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks it")
    plan = plan_device("auto", "auto")
    assert (plan.device.type, plan.precision, plan.is_cuda) == ("cpu", "fp32", False)
    assert plan.describe().startswith("cpu ") and plan.memory_bytes > 1 << 30 and plan.free_bytes() > 0


def test_bf16_autocast_is_a_choice_on_the_cpu_too() -> None:
    plan = plan_device("cpu", "bf16")
    model = build_model("tiny", VOCAB, seed=0)
    with plan.autocast():
        logits = model(input_ids=batch()).logits
    assert logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    ("cpu:1", "--device 'cpu:1': use auto, cpu, cuda or cuda:N"),
])
def test_a_device_that_is_not_one_of_the_forms_is_refused_with_the_forms(device: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message.replace("(", r"\(")):
        plan_device(device)


def test_a_precision_that_does_not_exist_is_refused() -> None:
    with pytest.raises(DeviceError, match="--precision 'fp8': use one of auto, fp32, bf16"):
        plan_device("cpu", "fp8")


def test_cuda_on_a_machine_without_it_is_refused_with_what_to_use_instead() -> None:
    if torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"this machine has \d+ CUDA device"):
            plan_device(f"cuda:{torch.cuda.device_count()}")
        return
    for asked in ("cuda", "cuda:3"):
        with pytest.raises(DeviceError, match=f"--device {asked}: PyTorch sees no CUDA device here .* use --device cpu"):
            plan_device(asked)


# -- the inner step ---------------------------------------------------------------------

def test_micro_batches_train_the_same_tokens_to_the_same_result_as_one_pass() -> None:
    plan = plan_device("cpu", "fp32")
    whole, split = build_model("tiny", VOCAB, seed=0), build_model("tiny", VOCAB, seed=0)
    # SGD: the update is the gradient itself (AdamW's sign-like update would blow float rounding up).
    whole_optimizer = torch.optim.SGD(whole.parameters(), lr=1.0)
    split_optimizer = torch.optim.SGD(split.parameters(), lr=1.0)
    for seed in range(3):
        rows = batch(rows=6, seed=seed)
        whole_loss = inner_step(whole, whole_optimizer, rows, plan)
        split_loss = inner_step(split, split_optimizer, rows, plan, micro_batch_size=4)  # passes of 4 and 2 rows
        assert torch.allclose(whole_loss, split_loss, rtol=1e-5)
    for a, b in zip(whole.parameters(), split.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(whole.parameters(), build_model("tiny", VOCAB, seed=0).parameters()))


def test_the_inner_step_returns_its_loss_as_a_tensor_on_the_device() -> None:
    plan = plan_device("cpu", "bf16")
    model = build_model("tiny", VOCAB, seed=0)
    loss = inner_step(model, inner_optimizer(list(model.parameters()), 1e-3, plan), batch(), plan)
    assert isinstance(loss, torch.Tensor) and loss.device == plan.device and loss.dtype == torch.float32
    assert 4.0 < float(loss) < 7.0  # near log(300) for a fresh model


# -- the outer state --------------------------------------------------------------------

def test_peers_in_fp32_and_bf16_that_apply_the_same_average_end_with_the_same_bits() -> None:
    states = []
    for precision in ("fp32", "bf16"):
        plan = plan_device("cpu", precision)
        model = build_model("tiny", VOCAB, seed=0)
        state = OuterState([p for p in model.parameters()], lr=0.7, momentum=0.9, plan=plan)
        optimizer = inner_optimizer(list(model.parameters()), 1e-2, plan)
        for seed in range(2):
            inner_step(model, optimizer, batch(seed=seed), plan)
        gradient = [torch.empty_like(p) for p in state.global_params]
        state.pseudo_gradient(into=gradient)
        states.append((model, state, gradient))
    (fp32_model, fp32_state, fp32_gradient), (bf16_model, bf16_state, bf16_gradient) = states
    assert tensors_digest(fp32_gradient) != tensors_digest(bf16_gradient)  # the precisions trained differently
    average = [(a + b) / 2 for a, b in zip(fp32_gradient, bf16_gradient)]
    fp32_state.step([a.clone() for a in average])
    bf16_state.step([a.clone() for a in average])
    assert tensors_digest(fp32_state.global_params) == tensors_digest(bf16_state.global_params)
    assert tensors_digest(fp32_state.momentum) == tensors_digest(bf16_state.momentum)
    assert tensors_digest(list(fp32_model.parameters())) == tensors_digest(list(bf16_model.parameters()))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in fp32_state.global_params)


def test_an_outer_state_that_does_not_fit_the_model_is_refused_and_changes_nothing() -> None:
    model = build_model("tiny", VOCAB, seed=0)
    state = OuterState(list(model.parameters()), lr=0.7, momentum=0.9, plan=plan_device("cpu"))
    before = tensors_digest(state.global_params)
    with pytest.raises(ValueError, match="this model needs"):
        state.load(state.state()[:-1])
    wrong_shape = state.state()
    wrong_shape[0] = torch.zeros(3)
    with pytest.raises(ValueError, match="an outer state tensor of shape"):
        state.load(wrong_shape)
    assert tensors_digest(state.global_params) == before


def test_the_digest_reads_any_dtype_and_matches_float32_bytes_as_before() -> None:
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert tensors_digest([values]) == hashlib.sha256(values.numpy().tobytes()).hexdigest()
    assert tensors_digest([values.bfloat16()]) != tensors_digest([values])
    assert tensors_digest([torch.tensor(1.0)]) == hashlib.sha256(torch.tensor(1.0).numpy().tobytes()).hexdigest()


@cuda_only
def test_on_cuda_the_model_and_adamw_live_on_the_gpu_and_the_outer_state_in_pinned_host_memory() -> None:
    plan = plan_device("cuda", "auto")
    model = build_model("tiny", VOCAB, seed=0).to(plan.device)
    state = OuterState(list(model.parameters()), lr=0.7, momentum=0.9, plan=plan)
    optimizer = inner_optimizer(list(model.parameters()), 1e-2, plan)
    inner_step(model, optimizer, batch(), plan)
    assert all(p.is_cuda for p in model.parameters())
    assert all(t.is_pinned() and not t.is_cuda for t in (*state.global_params, *state.momentum))
    gradient = [torch.empty_like(p) for p in state.global_params]
    state.pseudo_gradient(into=gradient)
    state.step(gradient)
    assert tensors_digest(list(model.parameters())) == tensors_digest(state.global_params)


# -- memory -----------------------------------------------------------------------------

def saved_activation_bytes(preset: str, rows: int, seq_len: int, precision: str) -> int:
    """What autograd really keeps for the backward pass of one forward, on the CPU."""
    plan = plan_device("cpu", precision)
    model = build_model(preset, VOCAB, seed=0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, VOCAB, (rows, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), plan.autocast():
        model(input_ids=tokens, labels=tokens)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_activation_estimate_bounds_what_autograd_saves_without_doubling_it(precision: str) -> None:
    workload = Workload("small", VOCAB, seq_len=64, batch_size=4)
    measured = saved_activation_bytes("small", 4, 64, precision)
    estimated = 4 * 64 * activation_bytes_per_token(workload, precision)
    bf16_weight_copies = 2 * parameter_count("small", VOCAB) if precision == "bf16" else 0  # counted per parameter
    assert measured - bf16_weight_copies <= estimated < 2 * measured


def test_the_estimate_counts_weights_gradients_adamw_and_the_host_side_outer_state() -> None:
    workload = Workload("1b", 65024, seq_len=2048, batch_size=8)
    fp32, bf16 = estimate(workload, "fp32"), estimate(workload, "bf16")
    assert fp32.parameters == bf16.parameters == parameter_count("1b", 65024)
    assert 1.0e9 < fp32.parameters < 1.2e9
    assert fp32.host_bytes == 16 * fp32.parameters  # global params, momentum, host copy, averager buffer
    assert bf16.device_bytes < fp32.device_bytes
    assert estimate(Workload("1b", 65024, 2048, 8, micro_batch_size=2), "bf16").device_bytes < bf16.device_bytes
    config = llama_config("1b", 65024)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 16, 32)
    assert (config.num_key_value_heads, config.intermediate_size, config.tie_word_embeddings) == (8, 8192, True)


def test_a_run_too_big_for_this_machine_is_refused_naming_the_preset_the_bytes_and_a_micro_batch_that_fits() -> None:
    plan = plan_device("cpu", "fp32")
    free = plan.free_bytes()
    rows = 1
    while estimate(Workload("tiny", 65024, 1024, rows), "fp32").device_bytes < 2 * free:
        rows *= 2
    workload = Workload("tiny", 65024, 1024, rows)
    with pytest.raises(DoesNotFit) as refused:
        check_fits(workload, plan)
    fits = largest_micro_batch(workload, plan, int(free * 0.9))
    message = str(refused.value)
    assert f"preset 'tiny' needs about" in message and "GiB free" in message
    assert f"--micro-batch-size {fits} (or less)" in message and 0 < fits < rows
    check_fits(Workload("tiny", 65024, 1024, rows, micro_batch_size=max(1, fits // 2)), plan)  # that fits


def test_a_model_that_does_not_fit_even_one_row_says_to_use_a_bigger_device() -> None:
    with pytest.raises(DoesNotFit, match="even one row per pass does not fit: join with a device that has more memory"):
        check_fits(Workload("lucie-7b", 65024, 4096, 8), plan_device("cpu", "fp32"))


def test_running_out_of_memory_while_training_becomes_advice_on_micro_batches_and_other_errors_pass() -> None:
    plan, workload = plan_device("cpu", "fp32"), Workload("tiny", VOCAB, 32, batch_size=8)
    with pytest.raises(OutOfDeviceMemory, match=r"ran out of memory while training .* --micro-batch-size below 8"):
        with out_of_memory_refused(plan, workload):
            torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator refuses at once
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with out_of_memory_refused(plan, workload):
            raise RuntimeError("shape mismatch")
