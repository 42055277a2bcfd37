#!/usr/bin/env bash
# Seventh session, second SmolLM2 call (issue 7). Round 26 (same card type) gave, without the padding mask:
# full fine-tune micro-batch 128 compiled 131,785 real tokens/s, + widths padded to 64: 212,604; with the mask
# the run ran out of memory at step 68 (the first 128 x 1,024 batch) on the 80 GB card. So here 60 steps (before
# that batch), all four combinations, each a fresh process with its own Inductor cache: baseline = the mask,
# no padding of widths (phi2sum before this session).
# Round 26's script with these variants and steps, without its profile.
STEPS=60 ONLY="${ONLY:-full-b128-compile-mask full-b128-compile-mask-pad64 full-b128-compile full-b128-compile-pad64}" \
  PROFILE=no exec bash bench/round26.sh "$@"
