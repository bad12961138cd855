"""Commands and helpers on top of the library: the train CLI (:mod:`.train`), the step benchmark
(:mod:`.bench`, :mod:`.bench_upsample`), FLOP counting (:mod:`.flops`), inference on a trained run
(:mod:`.inference`), soft-mask figures (:mod:`.visualize`), analysis (:mod:`.analyze`) and export
(:mod:`.export`)."""
