"""Generating text with a trained model: the sampling front over the samplers of
`pipeline.diffusion` (`sampling`), prompt and infilling templates (`templates`), open-gap lengths
(`gap_length`), long texts in blocks (`blocks`) and the three-line `DiffusionBert` API (`api`).
Below evaluation and serving, which both use it; it imports neither."""
