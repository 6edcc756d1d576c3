"""flowc: the pipeline compiler.

Pure and synchronous: it reads YAML, checks it, and builds the typed DAG that the runtime
executes. It never imports the runtime.
"""

__version__ = "0.1.0"

from flowc.compiler import CompileResult, Project, compile_file, compile_source  # noqa: E402
from flowc.diagnostics import RULES, Diagnostic, Severity  # noqa: E402
from flowc.ir import CompiledPipeline, StepNode  # noqa: E402
from flowc.model import InputSpec, LLMStep, MCPToolStep, Pipeline  # noqa: E402

__all__ = [
    "RULES",
    "CompileResult",
    "CompiledPipeline",
    "Diagnostic",
    "InputSpec",
    "LLMStep",
    "MCPToolStep",
    "Pipeline",
    "Project",
    "Severity",
    "StepNode",
    "__version__",
    "compile_file",
    "compile_source",
]
