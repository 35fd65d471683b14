"""Ray Serve application of GreenCode: gated generation behind the TGI, Ollama and OpenAI protocols."""
