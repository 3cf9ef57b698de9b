"""Kernel plumbing every backend shares: running tools (`runner`), entering a network
namespace from a thread (`nsthread`), the netfilter generation probe (`generation`), and
finding the cell's underlay interfaces (`underlay`)."""
