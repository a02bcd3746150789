"""Values a field of the wire may take, named once for the coordinator that checks them and the worker that sends them."""

PRECISIONS = ("fp32", "bf16")  # RegisterRequest.precision: what a worker's matmuls compute in (weights stay fp32)
# A registered worker's trust class. Only an admitted institution's certificate grants one of
# CERTIFIED_CLASSES (protocol/certificates.py); every other worker is a volunteer.
TRUST_CLASSES = ("hpc", "institution", "volunteer")
CERTIFIED_CLASSES = ("hpc", "institution")
VOLUNTEER = "volunteer"
INDEPENDENT = "independent"  # the institution of a worker no admitted institution certified; no certificate names it
# How pseudo-gradients go on the wire (worker/allreduce.py COMPRESSIONS; topk2bit: worker/sparse_codec.py).
COMPRESSIONS = ("none", "fp16", "8bit", "topk2bit")
# What a validator cannot compare with its replay (a sparse codec sends a residual it cannot know): only a run
# without spot checks may use them, so a vote may not switch a run to one.
UNCHECKABLE_COMPRESSIONS = ("topk2bit",)
# How a reducer combines the parts of its slice (worker/aggregation.py): RunConfig.aggregation, a run setting.
AGGREGATIONS = ("mean", "clipped_mean", "trimmed_mean")
# How a round's energy was obtained (CompleteRoundRequest.energy.method, worker/energy.py): a GPU's or
# the CPU package's own counter, or an estimate from the device's rated power and its measured use.
ENERGY_NVML, ENERGY_RAPL, ENERGY_ESTIMATE = "nvml", "rapl", "estimate"
ENERGY_METHODS = (ENERGY_NVML, ENERGY_RAPL, ENERGY_ESTIMATE)
