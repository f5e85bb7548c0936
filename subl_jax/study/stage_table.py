"""Every kind of stage, in one table: what it runs, the config paths and inputs it depends on, and its code.

A stage's fingerprint (`subl_jax.study.stages`) hashes exactly the declared config paths, the instance's parameters, the
inputs' fingerprints and the source of the declared modules (with every package module they import). So a changed
`model.remat_policy` re-trains but does not re-sample, a fix to the filter re-runs the filter and what follows, and
a moved workdir is still cached. The LLM study (`study.pipeline`), the jobs `sample`, `teacher`, `student` and
`train`, and the MNIST study (`mnist.job`) all run their stages from this table.
"""

from __future__ import annotations

from subl_jax.study.data import filter_stage, shuffle_stage
from subl_jax.study.audit import llm_audit, mnist_audit
from subl_jax.study.mnist import mitigate as mnist_mitigate, study as mnist_study
from subl_jax.study import sample_stage as sample_job
from subl_jax.study.stages import Stage
from subl_jax.study import evaluate_stage
from subl_jax.study.context import MODEL_OUTPUTS
from subl_jax.core.training import export
from subl_jax.study import quality_stage, student_stage, teacher_stage

TEACHER = Stage("teacher", teacher_stage.work, teacher_stage.config_paths,
                code=("subl_jax.study.teacher_stage",), cleanup=(export.TRAIN_CHECKPOINTS,))
PROMPTED = Stage("prompted", teacher_stage.prompted_work, MODEL_OUTPUTS, code=("subl_jax.study.teacher_stage",))
SAMPLE = Stage("sample", sample_job.sample_work, MODEL_OUTPUTS + ("sample",), inputs=("teacher",),
               code=("subl_jax.study.sample_stage",))
FILTER = Stage("filter", filter_stage.work, ("filter",), inputs=("samples",), code=("subl_jax.study.data.filter_stage",))
SHUFFLE = Stage("shuffle", shuffle_stage.work, (), inputs=("data",), code=("subl_jax.study.data.shuffle_stage",))
STUDENT = Stage("student", student_stage.work, student_stage.config_paths, inputs=student_stage.input_roles,
                code=("subl_jax.study.student_stage",), cleanup=(export.TRAIN_CHECKPOINTS,))
EVALUATE = Stage("evaluate", evaluate_stage.work, MODEL_OUTPUTS + ("eval",), inputs=("model",),
                 code=("subl_jax.study.evaluate_stage",))
EVALUATE_ICL = Stage("evaluate_icl", evaluate_stage.work, MODEL_OUTPUTS + ("eval",), inputs=("model", "examples"),
                     code=("subl_jax.study.evaluate_stage",))
# What a model is distilled for, on held-out numbers (issue #21): KL to the teacher, the filter's keep rate of its own
QUALITY = Stage("quality", quality_stage.work, MODEL_OUTPUTS + ("train.max_len", "train.system", "sample"),
                inputs=("model", "teacher", "data"), code=("subl_jax.study.quality_stage",))

MNIST_CODE = ("subl_jax.study.mnist.study",)
MNIST_MODELS = ("seed",) + tuple(f"mnist.{f}" for f in ("dataset", "data_dir", "n_models", "n_aux", "hidden",
                                                          "hidden_layers"))
MNIST_INITS = Stage("mnist_inits", mnist_study.inits_work, MNIST_MODELS, code=MNIST_CODE)
MNIST_TEACHER = Stage("mnist_teacher", mnist_study.teacher_work,
                      MNIST_MODELS + ("mnist.teacher_epochs", "mnist.batch_size", "mnist.opt"), inputs=("inits",),
                      code=MNIST_CODE)
MNIST_STUDENT = Stage("mnist_student", mnist_study.student_work,
                      MNIST_MODELS + ("mnist.student_epochs", "mnist.batch_size", "mnist.n_noise", "mnist.opt"),
                      inputs=("inits", "teacher"), code=MNIST_CODE)
MNIST_MITIGATED = Stage("mnist_mitigated", mnist_mitigate.mitigated_work,
                        MNIST_MODELS + ("mnist.student_epochs", "mnist.batch_size", "mnist.n_noise", "mnist.opt",
                                        "mitigation.mask_threshold", "mitigation.kl_weight", "audit.probe_size"),
                        inputs=("inits", "teacher"), code=("subl_jax.study.mnist.mitigate",))

MNIST_AUDIT = Stage("mnist_audit", mnist_audit.audit_work,
                    MNIST_MODELS + ("mnist.batch_size", "mnist.n_noise", "mnist.opt", "audit.n_batches",
                                    "audit.probe_size"),
                    inputs=("inits", "teacher", "student"), code=("subl_jax.study.audit.mnist_audit",))

# One per teacher of the LLM study, before its students: the signals of `llm_audit` (params: target, category, the
# probe's questions and answers).
LLM_AUDIT = Stage("llm_audit", llm_audit.audit_work, llm_audit.config_paths, inputs=llm_audit.INPUTS,
                  code=("subl_jax.study.audit.llm_audit",))

TABLE = {s.kind: s for s in (TEACHER, PROMPTED, SAMPLE, FILTER, SHUFFLE, STUDENT, EVALUATE, EVALUATE_ICL, QUALITY,
                             MNIST_INITS, MNIST_TEACHER, MNIST_STUDENT, MNIST_MITIGATED, MNIST_AUDIT, LLM_AUDIT)}
