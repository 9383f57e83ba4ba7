from infini_mlx import InfiniSession

# The embedded model; or a local directory or Hugging Face id, e.g.
# InfiniSession.load("mlx-community/Llama-3.2-1B-Instruct", segment_len=2048).
session = InfiniSession.load()

# The book streams through the model in pieces: memory stays the same size.
session.read("alice_in_wonderland.txt")
print(session.tokens_read, "tokens read")

# Each question is answered from a copy of the memory: ask as many as you like.
print(session.ask("Who is the White Rabbit?", max_tokens=64))
for text in session.stream_summarize(max_tokens=128, temp=0.5, top_p=0.95):
    print(text, end="", flush=True)
print()

# Keep the reading; answer later without reading the book again.
session.save("alice.state")
session = InfiniSession.restore("alice.state")
print(session.ask("How does the story end?", max_tokens=64))
