"""Corpora over HTTP."""

from rest_framework import generics, serializers

from ingestion import selectors
from ingestion.models import Corpus


class CorpusOutput(serializers.ModelSerializer):
    document_count = serializers.IntegerField(read_only=True)
    chat_model = serializers.CharField(source="effective_chat_model")
    embed_model = serializers.CharField(source="effective_embed_model")
    retrieval = serializers.SerializerMethodField()

    class Meta:
        model = Corpus
        fields = [
            "slug",
            "name",
            "description",
            "language",
            "chat_model",
            "embed_model",
            "retrieval",
            "document_count",
        ]

    def get_retrieval(self, corpus: Corpus) -> str:
        return "hybrid" if corpus.effective_embed_model else "bm25"


class CorpusList(generics.ListAPIView):
    serializer_class = CorpusOutput
    pagination_class = None

    def get_queryset(self):
        return selectors.corpora()
