"""Training-speed and memory levers, each a function that takes a model (or batch) and changes one thing.

Every lever is opt-in and independent of the pipeline (no Dagster import), so `train.fit` can switch
each on from `TrainConfig`, and `benchmarks/train_throughput.py` can measure what each one buys.

- `fp8_linear.convert_lora_base_to_fp8`: frozen base linears under LoRA run as FP8 matmuls (Hopper+).
- `answer_loss.answer_loss`: lm_head and cross-entropy only on answer tokens, not the full-vocabulary
  logits of every prompt and image position.
- `qlora.quantize_to_nf4` / `qlora.prepare_qlora`: nf4 + double quantization + bf16 compute, the
  unquantized weights in fp32 (as PEFT's `prepare_model_for_kbit_training`) or bf16, with
  non-reentrant checkpointing.
- `fused_lora.fuse_lora_linears`: base matmul + LoRA down/up + sum as one autograd function, and
  projections that read one input (q/k/v, gate/up) as one such function over their concatenation;
  the rank-r adds are `low_rank_add.add_low_rank` (a Triton kernel), and NF4 bases are dequantized
  by `nf4.nf4_linear` (one fused kernel per weight under torch.compile).
- `lora_inputs.keep_lora_inputs_bf16`: stop PEFT casting each LoRA input to the adapter's fp32 dtype.
- `compile.compile_decoder_layers`: regional torch.compile of the decoder layers.
- `checkpointing.enable_checkpointing`: non-reentrant checkpointing of every k-th decoder layer.

Measured on an H100 and an H200 in `benchmarks/NOTES.md`. FP8 in the forward changes the loss
curve there (see the notes); the others do not.
"""
