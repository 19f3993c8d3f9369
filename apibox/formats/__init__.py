"""Pure translations between wire formats. OpenAI's chat format is apibox's internal one."""
