"""landscape: how sharp is the minimum a trained network sits in?

The measurement engine: Objective -> HessianOperator -> estimators (see DESIGN.md).
"""

__version__ = "0.1.0"
