"""`sift`, the command line: `main.app` assembles the commands each module here adds."""
