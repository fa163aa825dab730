"""The served model: the MLflow pyfunc over the generation API (`pyfunc`) and logging, registering
and tagging it in the Model Registry (`registry`). Above tracking and generation; the maths and
tracking never import it."""
