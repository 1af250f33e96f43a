"""N-D parallelism (TP, SP, EP, pipelines, framework-built meshes) on 4 gloo ranks vs float64."""
