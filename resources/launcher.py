import sys

import dagster as dg
from pydantic import Field


class TrainingLauncher(dg.ConfigurableResource):
    """How the out-of-process trainer is started: plain Python, or `accelerate launch` across GPUs and hosts."""

    use_accelerate: bool = Field(default=False, description="Start the trainer with `accelerate launch` (needed for more than one process).")
    num_processes: int = Field(default=1, description="Processes in total (one per GPU), across all machines.")
    num_machines: int = Field(default=1, description="Hosts taking part; each runs this launch with its own machine_rank.")
    machine_rank: int = Field(default=0, description="This host's rank when num_machines > 1.")
    main_process_ip: str | None = Field(default=None, description="Address of the rank-0 host when num_machines > 1.")
    main_process_port: int = Field(default=29500, description="Rendezvous port on the rank-0 host.")
    sharding: str = Field(
        default="ddp", description="`ddp`: a full replica per GPU (models that fit one GPU); `fsdp`: parameters sharded across GPUs."
    )

    def command(self, module: str) -> list[str]:
        if not self.use_accelerate and self.num_processes == 1 and self.num_machines == 1:
            return [sys.executable, "-m", module]
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding={self.sharding!r}: choose 'ddp' or 'fsdp'")
        # accelerate's multi-GPU mode falls back to gloo processes on a machine without GPUs, so the
        # same launch line is tested on CPU in CI.
        mode = ["--multi_gpu"] if self.sharding == "ddp" else ["--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD"]
        launch = [
            sys.executable, "-m", "accelerate.commands.launch", *mode,
            "--num_processes", str(self.num_processes),
            "--num_machines", str(self.num_machines),
            "--machine_rank", str(self.machine_rank),
            "--main_process_port", str(self.main_process_port),
        ]
        if self.main_process_ip:
            launch += ["--main_process_ip", self.main_process_ip]
        return [*launch, "-m", module]
