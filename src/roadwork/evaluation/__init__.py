"""The evaluation layer: test metrics of what is served (:mod:`~roadwork.evaluation.metrics_table`), the
cascade's figures (:mod:`~roadwork.evaluation.cascade`), plots, the HTML report and model card
(:mod:`~roadwork.evaluation.report`) and the gradient-boosting comparison (:mod:`~roadwork.evaluation.compare`)."""
