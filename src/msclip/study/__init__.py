"""The sharing-spectrum study (`msclip study`): many ordinary training runs, one evaluation each, one report."""
