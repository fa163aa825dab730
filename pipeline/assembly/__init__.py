"""Library objects from params: the one place a `Params` becomes a noise schedule, a denoiser or a
corpus: `schedule.py`, `model.py`, `corpus.py`. The library itself takes plain arguments
(`pipeline.diffusion.schedules.build_schedule`, `pipeline.model.loading.build_denoiser`,
`pipeline.data.sources.load_corpus`); the stages, the training loop, the Ray driver, the evaluation
and the tests build theirs here, so they build the same ones."""
