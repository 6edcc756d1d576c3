"""flowc: the pipeline compiler.

Pure and synchronous: it reads YAML, checks it, and builds the typed DAG that the runtime
executes. It never imports the runtime.
"""

__version__ = "0.1.0"

from flowc.compiler import CompileResult, Project, compile_file, compile_source
from flowc.diagnostics import RULES, Diagnostic, Severity
from flowc.ir import CompiledPipeline, StepNode
from flowc.model import InputSpec, LLMStep, MCPToolStep, Pipeline

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
