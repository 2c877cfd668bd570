"""Study stage: the data-efficiency study and the paper's synthetic experiment."""
