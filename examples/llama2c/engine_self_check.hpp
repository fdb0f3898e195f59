// Self-check of an Engine (either backend) against a float64 reference of llama2.c's forward pass and
// sampler, through the Engine interface only: random models of several shapes (GQA and MHA, head
// sizes below and above a CUDA block, contexts longer than a block), slots stepped in random order
// at different positions, slot reuse and reset(), argmax and temperature sampling on the engine's own
// logits, sampled()/hidden() against the host copies, refused steps leaving the engine unchanged, and
// (given a model) the real checkpoint, also against the CPU engine. Written for the CUDA engine, which
// cannot be tested on machines without a GPU: run `collapse_llama2c selfcheck --backend cuda` there.
#pragma once
#include <cstdio>
#include <string>

#include "engine.hpp"

namespace llama2c {

// backend: "cpu" or "cuda". real_model may be null. quick: shorter schedules and no reset() rerun
// (for runs under compute-sanitizer). Prints one "PASS|FAIL|SKIP <check>: <numbers>" line per check
// to `log`, then a summary line; returns the number of failed checks.
int engine_self_check(const std::string& backend, const Model* real_model, std::FILE* log, bool quick = false);

}  // namespace llama2c
