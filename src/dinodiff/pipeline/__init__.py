"""The pipeline level: `DiNODiffusionPipeline` and its model folders (`diffusion`), and what every stage that draws
images uses on top of it: loading a pipeline with a sampler and precision, batches drawn one generator per item,
reconstructions of given images (`sample`), and the figures a person looks at (`figures`). Train's sample grids,
the sweep, classify (through `generate`), the demo and `generate` itself all call these; no stage lends them.
"""

from dinodiff.pipeline.diffusion import (
                                         DiNODiffusionPipeline,
                                         DiNODiffusionPipelineOutput,
                                         load_model_folder,
                                         run_cond_dropout,
                                         save_model_folder,
                                         to_uint8_array,
)

__all__ = ["DiNODiffusionPipeline", "DiNODiffusionPipelineOutput", "load_model_folder", "run_cond_dropout",
           "save_model_folder", "to_uint8_array"]
